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
    assert [w.worker_id for w in pool.expire(now=5.0, timeout=10.0)] == []
    assert {w.worker_id for w in pool.expire(now=11.0, timeout=10.0)} == {"p", "d"}
    assert pool.pick_prefill() is None and not pool.health()[0]


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        Pool("both")
