"""The router killed and started again on the same address: its workers register again by
themselves, drop what they ran for the old router, and serve the new one."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from baton.bench.cluster import Cluster
from tests.faults.conftest import random_prompt

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(cut_model):
    with Cluster.running({"p0": ("prefill",), "d0": ("decode",)}, model=cut_model) as c:
        yield c


def test_workers_re_register_after_a_router_restart(cluster, reference):
    c = cluster
    prompt = random_prompt(80, 24)
    assert c.complete(prompt, 8) == reference(prompt, 8)

    # A long stream is in flight when the router dies: its client loses the connection, and
    # the workers must not keep generating (or holding KV) for a client that is gone.
    outcome = {}

    def doomed():
        try:
            outcome["result"] = c.stream(random_prompt(81, 24), 1500)
        except httpx.HTTPError as e:
            outcome["error"] = e

    t = threading.Thread(target=doomed)
    t.start()
    deadline = time.monotonic() + 60
    while not c.worker_states()["d0"]["assigned"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c.kill_router()
    t.join(timeout=30)
    assert "error" in outcome, outcome

    c.start_router()
    for name in ("p0", "d0"):
        c.wait_worker(name, "ready", timeout=30)  # nobody restarted them: they came back
    assert all(p.poll() is None for p in c.workers.values())
    states = c.wait_idle()  # the old router's stream was dropped, its blocks freed
    assert {n: s["served"] for n, s in states.items()} == {"p0": 0, "d0": 0}
    # the new router's KV index came back with the workers' snapshots: p0 still caches the
    # full blocks of the prompts it prefilled for the old router
    assert states["p0"]["cached_blocks"] >= 2, states
    prompt = random_prompt(82, 24)
    assert c.complete(prompt, 8) == reference(prompt, 8)
