"""`baton bench` against a real `baton serve` on loopback: the table, the JSON, the sweep plots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def server(disagg):
    return disagg


def bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "baton.server.cli", "bench", *args, "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_bench_prints_the_table_and_saves_the_json(server, tmp_path):
    out = tmp_path / "run.json"
    p = bench(
        *("--base-url", server.url, "--num-prompts", "6", "--max-concurrency", "3"),
        *("--input-len", "24", "--output-len", "6", "--goodput", "ttft:60000"),
        *("--save-result", str(out), "--label", "loopback"),
    )
    assert p.returncode == 0, p.stderr
    assert "loopback" in p.stdout and "Mean TTFT (ms)" in p.stdout
    assert any(line.split()[-1] == "6" for line in p.stdout.splitlines() if "Successful" in line)
    r = json.loads(out.read_text())
    assert (r["completed"], r["failed"]) == (6, 0)
    assert r["total_input_tokens"] == 6 * 24 and r["total_output_tokens"] == 6 * 6
    assert len(r["ttfts"]) == 6 and all(0 < t < r["duration"] for t in r["ttfts"])
    assert all(len(itl) == 5 for itl in r["itls"])  # one chunk per token after the first
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])
    for key in ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms"):
        assert r[key] > 0
    assert r["median_tpot_ms"] > 0 and r["median_itl_ms"] > 0
    assert r["machine"]["cpu_count"] >= 1 and r["command"].startswith(("cli", "baton"))
    assert r["load"]["max_concurrency"] == 3 and r["load"]["request_rate"] == "inf"


def test_failures_are_counted_with_their_error(server, tmp_path):
    out = tmp_path / "bad.json"
    p = bench(
        *("--base-url", server.url, "--model", "nope", "--num-prompts", "3", "--num-warmups", "0"),
        *("--input-len", "8", "--output-len", "2", "--save-result", str(out)),
    )
    assert p.returncode == 1
    r = json.loads(out.read_text())
    assert (r["completed"], r["failed"]) == (0, 3)
    ((error, count),) = r["error_counts"].items()
    assert count == 3 and error.startswith("HTTP 404") and "nope" in error
    assert r["errors"] == [error] * 3  # the per-request list


def test_sweep_writes_one_run_per_value_and_the_plots(server, tmp_path):
    p = bench(
        "sweep",
        *("--base-url", server.url, "--max-concurrency", "1", "2", "--num-prompts", "2"),
        *("--input-len", "16", "--output-len", "4", "--goodput", "ttft:60000"),
        *("--endpoint", "/v1/chat/completions", "--output-dir", str(tmp_path)),
    )
    assert p.returncode == 0, p.stderr
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["axis"] == "max_concurrency"
    assert [r["sweep_value"] for r in sweep["runs"]] == [1, 2]
    assert all(r["completed"] == 2 for r in sweep["runs"])
    for name in ("throughput", "ttft", "tpot", "ttft_cdf", "goodput"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
