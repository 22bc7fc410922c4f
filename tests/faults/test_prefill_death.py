"""A prefill worker killed while it prefills: its requests are prefilled again elsewhere."""

from __future__ import annotations

import threading
import time

import pytest

from baton.bench.cluster import Cluster
from tests.faults.conftest import random_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(cut_model):
    workers = {"p0": ("prefill",), "p1": ("prefill",), "d0": ("decode",)}
    with Cluster.running(workers, model=cut_model) as c:
        yield c


def test_sigkill_of_a_prefill_worker_retries_its_queued_and_running_prefills(cluster, reference):
    # Long prompts prefill in 256-token chunks, so the first worker is mid-prefill when it dies
    # with more prompts queued behind; every request must still finish with the right text.
    prompts = [random_prompt(10 + i, 700) for i in range(4)]
    results: dict[int, tuple] = {}

    def run(i):
        results[i] = cluster.stream(prompts[i], 8)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    # Wait until a prefill worker holds requests, then kill it before any first token.
    deadline = time.monotonic() + 30
    victim = None
    while victim is None and time.monotonic() < deadline:
        busy = [
            (s["assigned"], w)
            for w, s in cluster.worker_states().items()
            if s["role"] == "prefill" and s["assigned"] >= 2
        ]
        victim = max(busy)[1] if busy else None
    assert victim is not None
    cluster.kill(victim)
    for t in threads:
        t.join(timeout=180)
    assert len(results) == 4
    assert [results[i] for i in range(4)] == [(t, None) for t in reference.many(prompts, 8)]
    assert cluster.worker_states()[victim]["state"] == "dead"
    cluster.wait_idle()  # the decode worker's reservations for the dead one's prompts: freed
