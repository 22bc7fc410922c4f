"""Fault injection against real processes: every test here starts its own cluster, serving the
cut default model (tests/conftest.py) unless it needs the full one's timing."""

from __future__ import annotations

import random

import pytest

from baton import SamplingParams
from tests.conftest import CUT_KV_SCALE

pytestmark = pytest.mark.slow


def random_prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(n)]


def cut_kv_gib(full_model_gib: float) -> str:
    """--kv-cache-gib giving the cut model as many blocks as `full_model_gib` gives the full one."""
    return str(full_model_gib * CUT_KV_SCALE)


@pytest.fixture(scope="session")
def reference(cut_llm):
    """Greedy text of the offline engine: what a served request must give, fault or not."""

    def ref(prompt: list[int], max_tokens: int) -> str:
        return many([prompt], max_tokens)[0]

    def many(prompts: list[list[int]], max_tokens: int) -> list[str]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return [o.outputs[0].text for o in cut_llm.generate(prompts, params)]

    ref.many = many  # one batch for several prompts
    return ref
