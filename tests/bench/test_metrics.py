"""The summary metrics on hand-made timings whose answers are known."""

from __future__ import annotations

import pytest

from baton.bench.metrics import RequestResult, compute_metrics, format_table, parse_goodput


def results() -> list[RequestResult]:
    # A: first chunk at 0.1 s, then 4 more 0.05 s apart: 5 tokens, e2e 0.3 s -> TPOT 0.05.
    a = RequestResult(True, 10, 5, 0.0, ttft=0.1, itl=[0.05] * 4, latency=0.3)
    # B: first chunk at 0.5 s, 2 tokens, e2e 0.7 s -> TPOT 0.2, one gap of 0.2.
    b = RequestResult(True, 20, 2, 0.1, ttft=0.5, itl=[0.2], latency=0.7)
    # C: a single token: no TPOT; D: failed.
    c = RequestResult(True, 30, 1, 0.2, ttft=0.3, itl=[], latency=0.3)
    d = RequestResult(False, 40, 0, 0.3, error="HTTP 503: busy")
    return [a, b, c, d]


def test_counts_and_throughputs():
    m = compute_metrics(results(), duration=2.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["error_counts"] == {"HTTP 503: busy": 1}
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 8
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["total_token_throughput"] == pytest.approx(34.0)


def test_latency_metrics_follow_vllm_definitions():
    m = compute_metrics(results(), duration=2.0)
    assert m["mean_ttft_ms"] == pytest.approx(300.0)  # (100 + 500 + 300) / 3
    assert m["median_ttft_ms"] == pytest.approx(300.0)
    assert m["mean_tpot_ms"] == pytest.approx(125.0)  # (50 + 200) / 2; C has no TPOT
    assert m["mean_itl_ms"] == pytest.approx(80.0)  # gaps pooled: (4 * 50 + 200) / 5
    assert m["median_itl_ms"] == pytest.approx(50.0)
    assert m["p99_itl_ms"] == pytest.approx(194.0)  # linear: 50 + 0.96 * (200 - 50)
    assert m["mean_e2el_ms"] == pytest.approx(433.333, rel=1e-4)
    assert m["p90_e2el_ms"] == pytest.approx(620.0)


def test_goodput_counts_requests_meeting_every_slo():
    r = results()
    assert compute_metrics(r, 2.0, {"ttft": 400})["request_goodput"] == pytest.approx(1.0)
    both = compute_metrics(r, 2.0, {"ttft": 400, "tpot": 40})  # A's TPOT is 50: only C
    assert both["request_goodput"] == pytest.approx(0.5)
    assert compute_metrics(r, 2.0, {"e2el": 1000})["request_goodput"] == pytest.approx(1.5)
    assert "request_goodput" not in compute_metrics(r, 2.0)


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:50.5"]) == {"ttft": 500.0, "tpot": 50.5}
    assert parse_goodput(None) == {}
    for bad in (["itl:5"], ["ttft"], ["ttft:abc"], ["tpot:-1"]):
        with pytest.raises(ValueError, match="goodput"):
            parse_goodput(bad)


def test_no_successful_request_still_summarises():
    m = compute_metrics([RequestResult(False, 5, 0, 0.0, error="boom")], 1.0)
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0.0
    with pytest.raises(ValueError, match="duration"):
        compute_metrics([], 0.0)


def test_table_shows_the_figures():
    table = format_table(compute_metrics(results(), 2.0, {"ttft": 400}), "run")
    assert "Successful requests" in table and "Request goodput (req/s)" in table
    assert "Mean TTFT (ms)" in table and "300.00" in table and "failed x1: HTTP 503" in table
