"""KV handoffs that fail (refused for lack of KV) or stall (a frozen decode worker): the request
is recomputed on the decode side, and every block on both sides is freed."""

from __future__ import annotations

import re
import signal
import threading

import httpx
import pytest

from baton.bench.cluster import Cluster
from tests.faults.conftest import cut_kv_gib, random_prompt

pytestmark = pytest.mark.slow


def kv_failures(cluster) -> float:
    page = httpx.get(cluster.url + "/metrics", timeout=10).text
    return float(re.search(r"^baton:kv_transfer_failures_total (\S+)$", page, re.M).group(1))


@pytest.fixture
def small_decode(cut_model):
    workers = {"p0": ("prefill",), "d0": ("decode", "--kv-cache-gib", cut_kv_gib(0.02))}
    with Cluster.running(workers, model=cut_model) as c:
        yield c


def test_a_refused_handoff_is_recomputed_on_the_decode_side(small_decode, reference):
    c = small_decode
    n = c.worker_states()["d0"]["num_blocks"]
    # A fills the decode worker's KV as it generates; B, half the cache long, arrives when A
    # holds more than half of it, so the decode worker refuses B's KV. A's chunks count its
    # tokens from below (a token that ends no character sends none): B starts at 60% of A's
    # chunks, past half of A's tokens and well before A ends.
    a_prompt, a_len = random_prompt(20, 16), (n - 1) * 16 - 16
    b_prompt = random_prompt(21, n // 2 * 16)
    results = {}
    b_thread = threading.Thread(target=lambda: results.setdefault("b", c.stream(b_prompt, 8)))

    def start_b(k):
        if k >= 0.6 * a_len and not b_thread.ident:
            b_thread.start()

    results["a"] = c.stream(a_prompt, a_len, on_chunk=start_b)
    assert b_thread.ident, "A's stream ended before 60% of its tokens sent text"
    b_thread.join(timeout=120)
    assert results["a"] == (reference(a_prompt, a_len), None)
    assert results["b"] == (reference(b_prompt, 8), None)
    assert kv_failures(c) >= 1  # B's handoff did fail: B took the fallback
    c.wait_idle()


@pytest.fixture
def frozen_decode(cut_model):
    c = Cluster("disagg", wait_router=False, model=cut_model)
    try:
        for name, role in (("p0", "prefill"), ("d0", "decode"), ("d1", "decode")):
            c.add_worker(name, role, "--kv-timeout", "1", wait=False)  # they load side by side
        c.wait_router()
        for name in ("p0", "d0", "d1"):
            c.wait_worker(name, "ready")
        yield c
    finally:
        c.signal("d0", signal.SIGCONT)
        c.close()


def test_a_stalled_handoff_times_out_and_the_request_still_finishes(frozen_decode, reference):
    c = frozen_decode
    c.signal("d0", signal.SIGSTOP)  # d0 looks alive to the router for a few seconds more
    prompts = [random_prompt(30 + i, 24) for i in range(2)]
    results = [c.stream(p, 12) for p in prompts]
    assert results == [(reference(p, 12), None) for p in prompts]
    assert kv_failures(c) >= 1
    # Woken up, the frozen worker learns it was given up, drops what it held and rejoins.
    c.signal("d0", signal.SIGCONT)
    c.wait_worker("d0", "ready", timeout=30)
    ws = c.wait_idle()
    assert ws["d0"]["num_free_blocks"] == ws["d0"]["num_blocks"]
