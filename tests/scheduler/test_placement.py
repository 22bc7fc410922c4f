"""Worker admission and placement: incompatible workers are refused, load and free KV decide."""

from __future__ import annotations

import pytest

from baton.scheduler.placement import Pool, WorkerState

LAYOUT = (30, 16, 3, 64, "float32")


def worker(wid, role, layout=LAYOUT, model="smollm2", **kw):
    return WorkerState(
        wid,
        role,
        1,
        "h",
        model,
        layout,
        "tcp://h:1" if role != "prefill" else "",
        4096,
        100,
        0.0,
        num_free_blocks=kw.pop("free", 100),
        **kw,
    )


def test_first_worker_fixes_model_and_layout():
    pool = Pool("disagg")
    assert pool.admit(worker("p", "prefill")) is None
    assert "layout" in pool.admit(worker("d", "decode", layout=(30, 32, 3, 64, "float32")))
    assert "model" in pool.admit(worker("d", "decode", model="other"))
    assert "role" in pool.admit(worker("b", "both"))
    assert pool.admit(worker("d", "decode")) is None
    assert set(pool.workers) == {"p", "d"}


def cpu(linear: str) -> dict:
    return {"threads": 2, "wait_policy": "brief", "cpus": "0-1", "linear": linear}


def test_workers_of_a_pool_run_one_cpu_linear_plan():
    pool = Pool("disagg")
    assert pool.admit(worker("gpu", "prefill")) is None  # no CPU plan: nothing to agree on
    assert pool.cpu_linear == ""
    assert pool.admit(worker("p", "prefill", cpu=cpu("mkl-packed"))) is None
    why = pool.admit(worker("d", "decode", cpu=cpu("dense@1,mkl-packed@3")))
    assert "'dense@1,mkl-packed@3' differs from the pool's 'mkl-packed'" in why
    assert "--cpu-linear mkl-packed" in why
    assert pool.admit(worker("d", "decode", cpu=cpu("mkl-packed"))) is None
    assert pool.workers["d"].as_dict()["cpu"]["linear"] == "mkl-packed"
    # once every worker of a plan is gone, another plan may start the pool again
    for w in pool.silent(now=11.0, timeout=10.0):
        pool.lose(w.worker_id)
    assert pool.admit(worker("d2", "decode", cpu=cpu("onednn-packed"))) is None


def test_colocated_pool_takes_only_colocated_workers():
    pool = Pool("colocated")
    assert "role" in pool.admit(worker("p", "prefill"))
    assert pool.health() == (False, "no colocated worker is ready")
    assert pool.admit(worker("b", "both")) is None
    assert pool.health()[0]
    assert pool.pick_prefill().worker_id == "b"


def test_picks_least_loaded_prefill_and_freest_decode():
    pool = Pool("disagg")
    pool.admit(worker("p1", "prefill", running=3))
    pool.admit(worker("p2", "prefill", running=1))
    pool.admit(worker("d1", "decode", free=10))
    pool.admit(worker("d2", "decode", free=50))
    assert pool.pick_prefill().worker_id == "p2"
    assert pool.pick_decode(5).worker_id == "d2"
    assert pool.pick_decode(101) is None  # more than any decode worker holds


def test_silent_workers_expire_and_health_follows():
    pool = Pool("disagg")
    pool.admit(worker("p", "prefill"))
    pool.admit(worker("d", "decode"))
    assert pool.health() == (True, "ready")
    assert [w.worker_id for w in pool.silent(now=5.0, timeout=10.0)] == []
    silent = pool.silent(now=11.0, timeout=10.0)
    assert {w.worker_id for w in silent} == {"p", "d"}
    assert pool.health()[0]  # silence alone changes nothing: losing the worker does
    for w in silent:
        pool.lose(w.worker_id)
    assert pool.pick_prefill() is None and not pool.health()[0]
    assert pool.silent(now=99.0, timeout=10.0) == []  # the dead are not lost twice


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        Pool("both")


def disagg_pool(**decode_free) -> Pool:
    pool = Pool("disagg")
    pool.admit(worker("p1", "prefill"))
    pool.admit(worker("p2", "prefill", running=2))
    for wid, free in (decode_free or {"d1": 50, "d2": 80}).items():
        pool.admit(worker(wid, "decode", free=free))
    return pool


def test_a_fresh_request_goes_prefill_then_freest_decode():
    first, decode = disagg_pool().plan(10, resumed=False)
    assert (first.worker_id, decode.worker_id) == ("p1", "d2")


def test_a_burst_between_heartbeats_is_spread_over_the_decode_workers():
    pool = disagg_pool(d1=100, d2=101)
    placed = []
    for i in range(4):  # no heartbeat in between: d2's lead of one block must not take them all
        first, decode = pool.plan(10, resumed=False)
        pool.assign(f"r{i}", [first.worker_id, decode.worker_id], blocks=10)
        placed.append(decode.worker_id)
    assert placed == ["d2", "d1", "d2", "d1"]
    assert pool.workers["p1"].num_free_blocks == 100  # a prefill worker keeps no KV of it
    # the next heartbeat says what is really free, whatever the router counted
    pool.beat("d1", draining=False, running=2, waiting=0, kv_usage=0.1, num_free_blocks=90)
    assert pool.workers["d1"].num_free_blocks == 90 and pool.workers["d2"].num_free_blocks == 81
    assert pool.plan(10, resumed=False)[1].worker_id == "d1"


def test_a_resumed_request_is_recomputed_on_one_decode_worker():
    pool = disagg_pool()
    first, decode = pool.plan(10, resumed=True)
    assert (first.worker_id, decode) == ("d2", None)
    # a failed handoff falls back to the decode side it was meant for, if it is still there
    assert pool.plan(10, resumed=True, recompute_on="d1")[0].worker_id == "d1"
    assert pool.plan(10, True, frozenset({"d1"}), recompute_on="d1")[0].worker_id == "d2"
    pool.workers["d1"].state = "dead"
    assert pool.plan(10, resumed=True, recompute_on="d1")[0].worker_id == "d2"


def test_avoided_draining_and_dead_workers_are_never_chosen():
    pool = disagg_pool()
    pool.workers["p1"].state = "draining"
    first, decode = pool.plan(10, False, frozenset({"d2"}))
    assert (first.worker_id, decode.worker_id) == ("p2", "d1")
    pool.workers["d1"].state = "dead"
    assert pool.plan(10, False, frozenset({"d2"})) is None  # no decode worker left


def test_with_no_prefill_worker_a_decode_worker_runs_the_request_alone():
    pool = disagg_pool()
    for wid in ("p1", "p2"):
        pool.workers[wid].state = "dead"
    first, decode = pool.plan(10, resumed=False)
    assert (first.worker_id, decode) == ("d2", None)


def test_colocated_plans_use_one_worker():
    pool = Pool("colocated")
    pool.admit(worker("b1", "both", running=1))
    pool.admit(worker("b2", "both"))
    assert pool.plan(10, resumed=False) == (pool.workers["b2"], None)
    assert pool.plan(10, True, frozenset({"b2"})) == (pool.workers["b1"], None)


def test_a_request_larger_than_every_decode_worker_never_fits():
    pool = disagg_pool(d1=50, d2=80)
    assert pool.never_fits(100) is None  # every worker holds 100 blocks: wait for them
    why = pool.never_fits(101)
    assert "101 KV blocks" in why and "has 100" in why
    for w in pool.workers.values():
        w.state = "dead"
    assert pool.never_fits(101) is None  # nothing known: placement says no worker instead


def test_only_the_most_recent_dead_workers_are_remembered():
    pool = Pool("disagg")
    for i in range(20):
        w = worker(f"d{i}", "decode")
        w.last_seen = float(i)
        assert pool.admit(w) is None
        pool.index.apply(f"d{i}", 0, True, [i], [])
        pool.lose(f"d{i}")
    assert pool.admit(worker("live", "decode")) is None
    gone = pool.prune_dead(keep=16)
    assert gone == [f"d{i}" for i in range(4)]  # the longest silent go first
    assert sorted(pool.workers) == sorted(["live", *(f"d{i}" for i in range(4, 20))])
    assert pool.prune_dead(keep=16) == []
    assert pool.workers["live"].state == "ready"
