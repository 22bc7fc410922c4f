"""Routing policies: what a worker holds against its queue, ties, and local prefill."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from baton.scheduler.placement import Pool
from baton.scheduler.routing import RoutingConfig
from tests.scheduler.test_placement import worker

KEYS = list(range(100, 110))  # a 10-block prompt (160 tokens at block size 16)


def pool(policy="kv", local=0, backlog=0, weight=256, turn=0, **workers) -> Pool:
    cfg = RoutingConfig(
        policy,
        load_weight=weight,
        max_local_prefill_tokens=local,
        max_local_turn_tokens=turn,
        prefill_backlog=backlog,
    )
    p = Pool("disagg", routing=cfg)
    for wid, kw in workers.items():
        p.admit(worker(wid, "prefill" if wid.startswith("p") else "decode", **kw))
    return p


def hold(p: Pool, wid: str, keys) -> None:
    assert p.index.apply(wid, 0, True, keys, [])


def test_kv_sends_a_prompt_where_its_prefix_is_unless_that_queue_costs_more():
    p = pool(p0={}, p1={}, d0={})
    hold(p, "p1", KEYS[:8])
    first, decode = p.plan(12, False, keys=KEYS, num_tokens=160)
    assert first.worker_id == "p1" and decode.worker_id == "d0"
    p.workers["p1"].running = 1  # 32 uncached + 256 > 160: the empty worker wins
    assert p.plan(12, False, keys=KEYS, num_tokens=160)[0].worker_id == "p0"
    p = pool(weight=64, p0={}, p1={"running": 1}, d0={})
    hold(p, "p1", KEYS[:8])
    assert p.plan(12, False, keys=KEYS, num_tokens=160)[0].worker_id == "p1"  # 32 + 64 < 160


def test_load_and_round_robin_ignore_what_workers_hold():
    p = pool("load", p0={}, p1={}, d0={})
    hold(p, "p1", KEYS)
    assert p.plan(12, False, keys=KEYS, num_tokens=160)[0].worker_id == "p0"
    p = pool("round-robin", p0={}, p1={}, d0={})
    picks = [p.plan(12, False, keys=KEYS, num_tokens=160)[0].worker_id for _ in range(4)]
    assert picks == ["p0", "p1", "p0", "p1"]


def test_decode_is_chosen_by_its_prefix_then_free_blocks():
    p = pool(p0={}, d0={"free": 90}, d1={"free": 50})
    assert p.plan(12, False, keys=KEYS, num_tokens=160)[1].worker_id == "d0"
    hold(p, "d1", KEYS[:3])
    assert p.plan(12, False, keys=KEYS, num_tokens=160)[1].worker_id == "d1"


def test_short_uncached_prompts_and_a_backed_up_prefill_pool_stay_local():
    p = pool(local=32, p0={}, d0={})
    assert p.plan(2, False, keys=[1], num_tokens=20) == (p.workers["d0"], None)
    assert p.plan(12, False, keys=KEYS, num_tokens=160)[1] is not None  # 160 uncached
    hold(p, "d0", KEYS[:9])  # the decode worker holds the history: 16 new tokens
    assert p.plan(12, False, keys=KEYS, num_tokens=160) == (p.workers["d0"], None)
    p = pool(backlog=2, p0={"running": 2}, p1={"waiting": 3}, d0={})
    assert p.plan(12, False, keys=KEYS, num_tokens=160) == (p.workers["d0"], None)
    p.workers["p1"].waiting = 1
    assert p.plan(12, False, keys=KEYS, num_tokens=160)[0].worker_id == "p1"


def test_a_next_turn_is_prefilled_where_its_history_is():
    """The decode worker holds more of the prompt than any prefill worker: up to
    max_local_turn_tokens of new tokens are prefilled there."""
    p = pool(local=32, turn=128, p0={}, d0={})
    hold(p, "p0", KEYS[:2])
    hold(p, "d0", KEYS[:4])  # 96 uncached there, 128 on p0
    assert p.plan(12, False, keys=KEYS, num_tokens=160) == (p.workers["d0"], None)
    hold(p, "p0", KEYS[:4])  # as much on the prefill worker: no reason to stay local
    assert p.plan(12, False, keys=KEYS, num_tokens=160)[1] is not None
    p = pool(local=32, turn=128, p0={}, d0={})
    hold(p, "d0", KEYS[:1])  # holds more, but 144 new tokens is past 128
    assert p.plan(12, False, keys=KEYS, num_tokens=160)[1] is not None


def test_a_dead_or_draining_worker_is_dropped_from_the_index():
    p = pool(p0={}, p1={}, d0={})
    hold(p, "p1", KEYS)
    p.beat("p1", draining=True, running=0, waiting=0, kv_usage=0.0, num_free_blocks=100)
    assert p.index.size("p1") == 0
    hold(p, "p0", KEYS)
    p.lose("p0")
    assert p.index.size("p0") == 0


@given(
    st.lists(st.tuples(st.integers(0, 10), st.integers(0, 3)), min_size=2, max_size=5),
    st.permutations(range(5)),
)
def test_ties_break_the_same_way_whatever_the_order(specs, order):
    """The choice depends on the workers, not on the order they joined in."""

    def build(perm):
        p = pool()
        ids = [f"p{i}" for i in range(len(specs))]
        for i in [k for k in perm if k < len(specs)]:
            p.admit(worker(ids[i], "prefill", running=specs[i][1]))
        p.admit(worker("d0", "decode"))
        for i, (held, _) in enumerate(specs):
            hold(p, ids[i], KEYS[:held])
        return p.plan(12, False, keys=KEYS, num_tokens=160)[0].worker_id

    assert build(list(range(5))) == build(list(order))


def test_bad_config():
    with pytest.raises(ValueError, match="routing"):
        RoutingConfig("random")
