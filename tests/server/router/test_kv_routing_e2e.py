"""KV-aware routing with real processes (the cut default model): two prefill workers, one
decode worker."""

from __future__ import annotations

import random
import re
import threading

import httpx
import pytest

from baton import SamplingParams
from baton.bench.cluster import Cluster

pytestmark = pytest.mark.slow


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(n)]


@pytest.fixture(scope="module")
def cluster(cut_model):
    workers = {"p0": ("prefill",), "p1": ("prefill",), "d0": ("decode",)}
    with Cluster.running(workers, router_args=("--routing", "kv"), model=cut_model) as c:
        yield c


def complete(c: Cluster, ids: list[int], max_tokens: int = 4) -> dict:
    r = httpx.post(c.url + "/v1/completions", json=c.body(ids, max_tokens), timeout=120)
    r.raise_for_status()
    return r.json()


def served(c: Cluster) -> dict[str, int]:
    return {w["id"]: w["served"] for w in httpx.get(c.url + "/workers", timeout=10).json()}


def test_a_second_turn_lands_where_its_prefix_is_and_computes_only_its_new_tokens(cluster):
    a, b = prompt(1, 160), prompt(2, 160)
    # at once: the second goes to the other prefill worker (the first one is busy)
    threads = [threading.Thread(target=complete, args=(cluster, p, 8)) for p in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    before = served(cluster)
    assert before["p0"] == before["p1"] == 1
    cluster.wait_idle()
    workers = {w["id"]: w for w in httpx.get(cluster.url + "/workers", timeout=10).json()}
    assert workers["p0"]["cached_blocks"] >= 10 and workers["p1"]["cached_blocks"] >= 10
    # b's next turn: whichever worker held b takes it, and reuses b's blocks
    for turn in (a + [7, 8, 9] * 10, b + [5, 6] * 15):
        before = served(cluster)
        r = complete(cluster, turn)
        after = served(cluster)
        (took,) = [w for w in ("p0", "p1") if after[w] > before[w]]
        cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == 160, (took, cached)  # every full block of the earlier turn
    # the two turns went to different workers: each to its own prefix
    assert served(cluster)["p0"] == served(cluster)["p1"] == 2


def metric(c: Cluster, name: str) -> float:
    page = httpx.get(c.url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", page, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_decode_side_hit_ships_only_the_missing_blocks(cluster, cut_llm):
    """The decode worker holds the previous turn (its prompt and answer): the next turn's
    handoff sends only the blocks after them, and the tokens are the colocated engine's."""
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first = prompt(5, 96)  # 6 full blocks
    complete(cluster, first, 8)
    answer = cut_llm.generate([first], greedy)[0].outputs[0].token_ids
    turn = first + list(answer) + prompt(6, 40)  # 144 tokens: 9 blocks, 6 held by the decoder
    cluster.wait_idle()
    sent0 = metric(cluster, "baton:kv_transfer_bytes_total")
    skipped0 = metric(cluster, "baton:kv_transfer_skipped_bytes_total")
    r = complete(cluster, turn, 8)
    sent = metric(cluster, "baton:kv_transfer_bytes_total") - sent0
    skipped = metric(cluster, "baton:kv_transfer_skipped_bytes_total") - skipped0
    assert skipped > 0 and sent > 0
    assert skipped / sent == 6 / 3  # 6 blocks held, 3 shipped
    assert r["choices"][0]["text"] == cut_llm.generate([turn], greedy)[0].outputs[0].text


def test_a_killed_worker_leaves_the_index_and_requests_still_complete(cluster):
    c = prompt(7, 160)
    before = served(cluster)
    complete(cluster, c)
    after = served(cluster)
    (holder,) = [w for w in ("p0", "p1") if after[w] > before[w]]
    cluster.kill(holder)
    cluster.wait_worker(holder, "dead", timeout=30)
    workers = {w["id"]: w for w in httpx.get(cluster.url + "/workers", timeout=10).json()}
    assert workers[holder]["cached_blocks"] == 0
    r = complete(cluster, c + [1, 2, 3])  # its prefix: now computed on the other worker
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
