"""Fault injection against real processes: every test here starts its own cluster."""

from __future__ import annotations

import random

import pytest

from baton import SamplingParams

pytestmark = pytest.mark.slow


def random_prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(n)]


@pytest.fixture(scope="session")
def reference(smollm2):
    """Greedy text of the offline engine: what a served request must give, fault or not."""

    def ref(prompt: list[int], max_tokens: int) -> str:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return smollm2.generate([prompt], params)[0].outputs[0].text

    return ref
