"""benchmarks/guided_cost.py --quick on CPU: its JSON has every section with positive times, and
the constrained rows really were masked (a matcher each, a mask row each per step, outputs a
fresh matcher of the schema takes, which the free rows' outputs are not). No timing thresholds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from baton.bench.cluster import CPU_LINEAR

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def result(tmp_path_factory, cut_model):
    out = tmp_path_factory.mktemp("guided") / "guided_cost.json"
    cmd = [sys.executable, "benchmarks/guided_cost.py", "--quick", "--device", "cpu"]
    cmd += ["--model", cut_model]  # what is checked is the masking, not the model's text
    cmd += ["--cpu-linear", CPU_LINEAR, "--output", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "ms/step" in p.stdout and "cold ms" in p.stdout and "saved" in p.stdout
    return json.loads(out.read_text())


def test_every_scenario_ran_its_steps_with_positive_times(result):
    rows = {(r["batch"], r["scenario"]): r for r in result["steps"]}
    assert set(rows) == {(1, "free"), (1, "json"), (4, "free"), (4, "json"), (4, "half")}
    for (batch, name), r in rows.items():
        assert r["constrained"] == {"free": 0, "json": batch, "half": batch // 2}[name]
        assert len(r["step_ms"]) == result["args"]["steps"] * result["args"]["rounds"]
        assert all(t > 0 for t in r["step_ms"]) and r["step_ms_median"] > 0
        assert r["step_ms_p25"] <= r["step_ms_median"] <= r["step_ms_p75"]
        assert r["rows_advanced"] == [batch]  # every row decoded in every timed step
        assert r["all_running"]  # no row ended (its grammar done or broken) before the abort
        assert (r["added_pct"] is None) == (name == "free")


def test_constrained_rows_were_masked_and_stayed_in_the_schema(result):
    for r in result["steps"]:
        n = r["constrained"]
        assert r["with_matcher"] == [n]
        assert r["mask_rows"] == [n]  # the mask of each timed step covered exactly those rows
        assert r["constrained_valid"] == [n] and r["constrained_start_brace"] == [n]
        # the check can tell: the same prompts unconstrained do not write the schema's JSON
        assert r["free_valid"] == [0]
        if n == 0:
            assert r["in_step"]["apply_ms"] == 0 and r["isolated"] is None
            assert r["allowed_frac"] is None
            continue
        assert r["sample_constrained"].lstrip().startswith("{")
        assert 0 < r["allowed_frac"] < 1  # the masks did forbid tokens, and allowed some
        s, i = r["in_step"], r["isolated"]
        assert s["mask_ms"] > 0 and s["apply_ms"] > 0 and s["accept_ms"] > 0
        assert s["guided_ms"] >= s["apply_ms"] and s["guided_pct_of_free"] > 0
        assert i["bitmask_same_state_ms"] > 0 and i["apply_ms"] > 0
        assert len(r["added_pct_rounds"]) == 1 and r["added_pct_paired"] is not None


def test_compile_times_and_the_record(result):
    c = result["compile"]
    assert c["first_compile_incl_tokenizer_ms"] > 0 and c["tokenizer_build_ms"] > 0
    assert [s["schema"] for s in c["schemas"]] == ["small", "medium", "large"]
    sizes = [s["spec_bytes"] for s in c["schemas"]]
    assert sizes == sorted(sizes)
    for s in c["schemas"]:
        assert s["cold_ms"] > 0 and s["cached_ms"] > 0 and s["check_ms"] > 0
    # the first, then per schema one cold variant and the one the cached timings reuse
    assert c["num_compiled"] == 1 + 2 * len(c["schemas"])
    assert result["target"] == {"batch": 16, "max_added_pct": 10.0, "added_pct": None, "met": None}
    assert result["engine"]["device"] == "cpu" and result["engine"]["vocab_size"] > 0
    assert result["machine"]["cpu"] and "torch" in result["machine"]
    assert "guided_cost.py" in result["command"]
