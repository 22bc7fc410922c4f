"""benchmarks/routing.py's arithmetic, without a cluster: router metrics parsed and diffed, pool
hit rates, a run's row, and the kv-vs-load target checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from baton.bench.multi_turn import TurnResult

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import routing  # noqa: E402
from bench import routing_report as report  # noqa: E402

BEFORE = """\
# HELP baton:prefix_cache_queries_total Prefix cache queries, in tokens.
# TYPE baton:prefix_cache_queries_total counter
baton:prefix_cache_queries_total{worker="p0"} 100.0
baton:prefix_cache_queries_total{worker="d0"} 10.0
baton:prefix_cache_hits_total{worker="p0"} 20.0
baton:prompt_tokens_total 110.0
baton:kv_transfer_bytes_total 1000.0
baton:requests_placed_total{path="handed_off"} 2.0
baton:kv_transfer_duration_seconds_count 2.0
baton:kv_transfer_duration_seconds_bucket{le="0.01"} 1.0
"""

AFTER = """\
baton:prefix_cache_queries_total{worker="p0"} 300.0
baton:prefix_cache_queries_total{worker="p1"} 100.0
baton:prefix_cache_queries_total{worker="d0"} 60.0
baton:prefix_cache_queries_total{worker="d1"} 40.0
baton:prefix_cache_hits_total{worker="p0"} 220.0
baton:prefix_cache_hits_total{worker="p1"} 20.0
baton:prefix_cache_hits_total{worker="d0"} 50.0
baton:prompt_tokens_total 610.0
baton:routing_cached_prompt_tokens_total 240.0
baton:kv_transfer_bytes_total 5000.0
baton:kv_transfer_skipped_bytes_total 3000.0
baton:requests_placed_total{path="handed_off"} 5.0
baton:requests_placed_total{path="local"} 1.0
baton:kv_transfer_duration_seconds_count 5.0
baton:kv_transfer_duration_seconds_bucket{le="0.01"} 4.0
"""

ROLES = {"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode"}


def test_metrics_parse_and_diff_by_name_and_labels():
    before, after = report.parse_metrics(BEFORE), report.parse_metrics(AFTER)
    assert before[("baton:prefix_cache_queries_total", (("worker", "p0"),))] == 100.0
    assert before[("baton:kv_transfer_duration_seconds_bucket", (("le", "0.01"),))] == 1.0
    d = report.delta(before, after)
    assert report.total(d, "baton:prefix_cache_queries_total") == 390.0
    assert report.total(d, "baton:prefix_cache_queries_total", worker="p1") == 100.0  # new: from 0
    assert report.total(d, "baton:requests_placed_total", path="handed_off") == 3.0
    assert report.total(d, "baton:requests_placed_total", path="colocated") == 0.0
    assert report.total(d, "baton:nothing") == 0.0
    assert report.settled(after) and report.settled(before)
    unsettled = AFTER.replace("seconds_count 5.0", "seconds_count 4.0")
    assert not report.settled(report.parse_metrics(unsettled))


def test_hit_rate_sums_over_the_workers_of_each_role():
    d = report.delta(report.parse_metrics(BEFORE), report.parse_metrics(AFTER))
    assert report.hit_rate(d, ROLES, "prefill") == pytest.approx(220 / 300)
    assert report.hit_rate(d, ROLES, "decode") == pytest.approx(50 / 90)
    assert report.hit_rate({}, ROLES, "decode") is None  # nothing queried


def test_a_run_row():
    d = report.delta(report.parse_metrics(BEFORE), report.parse_metrics(AFTER))
    later = {("baton:kv_transfer_bytes_total", ()): 1500.0}
    later[("baton:kv_transfer_skipped_bytes_total", ())] = 2500.0
    results = [TurnResult(True, 100, 4, 0.0, ttft=0.1, conversation=0, turn=0, cached_tokens=0)]
    results += [TurnResult(True, 200, 4, 0.5, ttft=0.05, conversation=0, turn=1, cached_tokens=96)]
    results += [TurnResult(True, 300, 4, 0.9, ttft=0.03, conversation=0, turn=2, cached_tokens=192)]
    results += [TurnResult(False, 0, 0, 0.9, conversation=1, turn=1)]
    bench = {"completed": 3, "failed": 1, "median_ttft_ms": 50.0, "p90_ttft_ms": 90.0}
    bench |= {"median_tpot_ms": 10.0, "output_throughput": 12.0}
    row = report.summarize(bench, results, d, ROLES, later)
    assert (row["prompt_tokens"], row["cached_tokens"], row["prompt_tokens_computed"]) == (
        600,
        288,
        312,
    )
    assert row["kv_bytes"] == 4000.0 and row["kv_skipped_bytes"] == 3000.0
    assert row["router_prompt_tokens"] == 500.0 and row["routing_cached_prompt_tokens"] == 240.0
    assert row["placements"] == {"handed_off": 3.0, "local": 1.0, "colocated": 0.0}
    assert row["later_turns"] == 2  # the failed one is not counted
    assert row["kv_bytes_per_later_turn"] == 750.0
    assert row["kv_skipped_bytes_per_later_turn"] == 1250.0
    assert row["median_ttft_ms_after_first_turn"] == pytest.approx(40.0)
    assert row["prefill_hit_rate"] == pytest.approx(220 / 300)
    assert report.summarize(bench, results, d, ROLES, None).keys().isdisjoint({"later_turns"})
    line = report.format_rows([_row("multi-turn", "kv", **row)]).splitlines()[-1]
    assert line.split()[:5] == ["multi-turn", "kv", "0", "50", "90"]
    assert "73/56" in line and "3/1/0" in line and "(1 failed)" in line


def _row(workload, policy, local=0, **kw):
    return {"workload": workload, "policy": policy, "max_local_prefill_tokens": local, **kw}


def test_targets_compare_kv_with_load_per_local_setting():
    mt = dict(prompt_tokens_computed=1000, median_ttft_ms=300.0, kv_bytes_per_later_turn=4e6)
    rows = [
        _row("multi-turn", "load", **mt),
        _row(
            "multi-turn",
            "kv",
            prompt_tokens_computed=400,
            median_ttft_ms=250.0,
            kv_bytes_per_later_turn=1e6,
        ),  # fmt: skip
        _row("random", "load", output_throughput=100.0),
        _row("random", "kv", output_throughput=96.0),
        _row("random", "round-robin", output_throughput=50.0),
        _row("random", "load", 32, output_throughput=100.0),
        _row("random", "kv", 32, output_throughput=90.0),
        _row("multi-turn", "kv", 32, **mt),  # no load run at 32: no multi-turn check there
    ]
    checks = {(c["max_local_prefill_tokens"], c["name"]): c for c in report.check_targets(rows)}
    assert len(checks) == 5
    computed = checks[(0, "multi-turn prompt tokens computed, load/kv")]
    assert computed["value"] == pytest.approx(2.5) and computed["met"]
    ttft = checks[(0, "multi-turn median TTFT, load/kv")]
    assert ttft["value"] == pytest.approx(1.2) and ttft["met"] is False
    kv = checks[(0, "multi-turn KV bytes per later turn, kv's cut")]
    assert kv["value"] == pytest.approx(0.75) and kv["met"]
    assert checks[(0, "random output tok/s, kv's cost")]["value"] == pytest.approx(0.04)
    assert checks[(0, "random output tok/s, kv's cost")]["met"]
    assert checks[(32, "random output tok/s, kv's cost")]["met"] is False
    zero = [
        _row("random", "load", output_throughput=0.0),
        _row("random", "kv", output_throughput=0.0),
    ]
    (undefined,) = report.check_targets(zero)
    assert undefined["value"] is None and undefined["met"] is None
    text = report.format_checks(report.check_targets(rows))
    assert "MISSED" in text and "met" in text


def test_quick_sizes_and_defaults():
    p = routing.build_parser()
    args = p.parse_args(["--turns", "3"])
    assert args.turns == 3 and args.conversations is None  # main fills in the defaults
    assert set(routing.SIZES) <= set(vars(args))
