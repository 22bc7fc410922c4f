"""The CPU linear plan: its text form, the choice from timings, and the per-host cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.server.models import cpu_linear_plan as lp
from baton.server.models.cpu_linear_plan import MARGIN, LinearPlan, choose

ROWS = (1, 4, 16, 64)


def timings(**per_kernel: tuple[float, ...]) -> dict[str, dict[int, float]]:
    return {k.replace("_", "-"): dict(zip(ROWS, v, strict=True)) for k, v in per_kernel.items()}


def test_plans_read_and_print_as_kernel_at_rows():
    plan = LinearPlan.parse("dense@1, mkl-packed@3")
    assert str(plan) == "dense@1,mkl-packed@3"
    assert [plan.kernel_for(r) for r in (0, 1, 2, 3, 900)] == ["dense"] * 3 + ["mkl-packed"] * 2
    assert plan.forms == {"dense", "mkl-packed"}
    assert str(LinearPlan.parse("onednn-packed")) == "onednn-packed"
    assert LinearPlan.parse("onednn@1,dense@8").forms == {"dense"}  # both read the weight as is


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("fast", "unknown kernel 'fast'"),
        ("dense@2", "must start at 1 row"),
        ("dense@1,mkl-packed@1", "must start at 1 row and increase"),
        ("dense@one", "'dense@one' is not kernel@rows"),
    ],
)
def test_bad_plans_are_refused_by_name(text, match):
    with pytest.raises(ValueError, match=f"cpu_linear: .*{match}"):
        LinearPlan.parse(text)


def test_a_pinned_plan_is_used_as_is_and_must_be_runnable(monkeypatch):
    plan, source = lp.resolve_plan("dense@1,mkl-packed@4", [])
    assert (str(plan), source) == ("dense@1,mkl-packed@4", "pinned")
    monkeypatch.setattr(lp, "available", lambda: ("dense",))
    with pytest.raises(ValueError, match="cannot run mkl-packed .*available: dense"):
        lp.resolve_plan("mkl-packed", [])


def test_one_form_of_the_weights_when_it_is_close_to_the_best_everywhere():
    t = timings(
        dense=(10, 20, 40, 80),
        onednn=(12, 22, 41, 79),
        mkl_packed=(9, 11, 20, 50),
        onednn_packed=(9.5, 10.5, 21, 48),  # a little faster at 4 and 64: within the margin
    )
    assert str(choose(t)) == "mkl-packed"


def test_a_second_form_only_where_it_is_clearly_faster():
    t = timings(
        dense=(10, 20, 40, 80),
        onednn=(12, 22, 41, 79),
        mkl_packed=(20, 11, 20, 50),  # twice as slow as F.linear at one row
        onednn_packed=(30, 30, 60, 120),
    )
    plan = choose(t)
    assert str(plan) == "dense@1,mkl-packed@4"
    assert plan.forms == {"dense", "mkl-packed"}  # the memory of a second copy: a clear gain


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(1.0, 100.0), min_size=16, max_size=16))
def test_the_plan_is_never_clearly_slower_than_f_linear_and_keeps_few_forms(values):
    kernels = ("dense", "onednn", "mkl-packed", "onednn-packed")
    t = {k: dict(zip(ROWS, values[4 * i : 4 * i + 4], strict=True)) for i, k in enumerate(kernels)}
    plan = choose(t)
    for r in ROWS:
        assert t[plan.kernel_for(r)][r] <= (1 + MARGIN) * t["dense"][r]
    assert len(plan.forms) <= 3
    for r in ROWS:  # within its forms, the fastest kernel
        mine = [k for k in kernels if lp.KERNELS[k][0] in plan.forms]
        assert t[plan.kernel_for(r)][r] == min(t[k][r] for k in mine)


def test_measuring_times_each_kernel_at_each_row_count():
    gen = torch.Generator().manual_seed(0)
    units = [(torch.randn(24, 16, generator=gen), None)] * 3 + [(torch.randn(16, 24), None)]
    probe = lp.probe_weights(units)
    assert [(tuple(w.shape), n) for w, _, n in probe] == [((24, 16), 3.0), ((16, 24), 1.0)]
    times = lp.measure(probe, ("dense", "mkl-packed"), rows=(1, 8))
    assert set(times) == {"dense", "mkl-packed"}
    assert all(set(v) == {1, 8} and min(v.values()) > 0 for v in times.values())


def test_a_step_larger_than_the_last_level_cache_is_timed_from_memory():
    gen = torch.Generator().manual_seed(0)
    probe = lp.probe_weights([(torch.randn(64, 32, generator=gen), None)] * 4)
    assert lp.step_bytes(probe) == 4 * 64 * 32 * 4
    assert lp.cache_evictor(probe, llc=lp.step_bytes(probe)) is None  # fits: stays cached
    flush = lp.cache_evictor(probe, llc=1024)
    assert flush is not None
    flush()
    calls = []
    lp.measure(probe, ("dense",), rows=(1, 4), evict=lambda p: lambda: calls.append(1))
    assert len(calls) == 2 * lp.REPEATS  # before every timed call, each shape, each row count


def test_a_tall_head_is_timed_on_a_slice_that_counts_for_the_rest():
    head = torch.zeros(3 * lp.MAX_PROBE_ROWS, 8)
    ((w, _, n),) = lp.probe_weights([(head, None)])
    assert w.shape == (lp.MAX_PROBE_ROWS, 8) and n == 3.0


FAKE_TIMES = timings(
    dense=(10, 20, 40, 80),
    onednn=(12, 22, 41, 79),
    mkl_packed=(20, 11, 20, 50),
    onednn_packed=(30, 30, 60, 120),
)


def test_a_host_measures_once_then_reads_its_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lp, "measure", lambda probe: calls.append(1) or FAKE_TIMES)
    probe = lp.probe_weights([(torch.zeros(8, 4), None)])
    assert lp.measured_plan(probe, tmp_path) == (choose(FAKE_TIMES), "measured")
    assert lp.measured_plan(probe, tmp_path) == (choose(FAKE_TIMES), "cached")
    assert len(calls) == 1
    (entry,) = (tmp_path / "cpu-linear").glob("*.json")
    record = json.loads(entry.read_text())
    assert record["plan"] == "dense@1,mkl-packed@4" and record["key"]["threads"] >= 1
    # another thread count is another key; a broken entry is measured again
    monkeypatch.setattr(lp.torch, "get_num_threads", lambda: 97)
    assert lp.measured_plan(probe, tmp_path)[1] == "measured"
    entry.write_text("{not json")
    monkeypatch.undo()
    monkeypatch.setattr(lp, "measure", lambda probe: calls.append(1) or FAKE_TIMES)
    assert lp.measured_plan(probe, tmp_path)[1] == "measured"


# Two workers of one host starting together: the lock makes the second read the first's plan.
RACE = """
import json, sys, time
import torch
from baton.server.models import cpu_linear_plan as lp
times = json.loads(sys.argv[2])
def slow(probe):
    time.sleep(0.5)
    with open(sys.argv[3], "a") as f:
        f.write("measured\\n")
    return {k: {int(r): t for r, t in v.items()} for k, v in times.items()}
lp.measure = slow
plan, source = lp.measured_plan(lp.probe_weights([(torch.zeros(8, 4), None)]), sys.argv[1])
print(plan, source)
"""


def test_workers_starting_together_measure_once_and_agree(tmp_path):
    log = tmp_path / "measures.log"
    args = [str(tmp_path), json.dumps(FAKE_TIMES), str(log)]
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE, *args], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = sorted(p.communicate(timeout=120)[0].split() for p in procs)
    assert log.read_text().splitlines() == ["measured"]
    assert outs == [["dense@1,mkl-packed@4", "cached"], ["dense@1,mkl-packed@4", "measured"]]
