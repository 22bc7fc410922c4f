"""Every kernel variant the engine launches compiles for Hopper (and Ampere, in the full matrix),
fits the target's shared memory and does not spill: checked on CPU, before any GPU sees it.

The compiling runs in one subprocess without TRITON_INTERPRET (this suite interprets kernels);
each variant is its own test case. `make compile-check` runs the full matrix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from baton.kernels.compile_check import MATRICES, cases

MATRIX = os.environ.get("BATON_COMPILE_MATRIX", "quick")
CASES = cases(MATRIX)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("compile") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "baton.kernels.compile_check", "--matrix", MATRIX]
    proc = subprocess.run(
        [*cmd, "--json", str(out)], env=env, capture_output=True, text=True, timeout=3000
    )
    if not out.exists():
        pytest.fail(
            f"the compile check did not finish:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
        )
    print(proc.stdout.splitlines()[-1])  # "<n> variants compiled by triton <v>, <m> failed"
    return {c["id"]: c for c in json.loads(out.read_text())["cases"]}


def test_installed_triton_is_in_the_supported_range():
    import tomllib
    from pathlib import Path

    import triton
    from packaging.requirements import Requirement

    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if d.startswith("triton"))
    assert req.specifier.contains(triton.__version__), (triton.__version__, str(req.specifier))
    assert not req.specifier.contains("3.5.0")  # the GPU machine's 3.6 is the floor


def test_compile_matrix_covers_every_kernel_model_and_dtype():
    kernels = {c.launch.name for c in CASES}
    assert kernels == {
        "_rms_norm_kernel",
        "_rotary_kernel",
        "_silu_mul_kernel",
        "_store_kv_kernel",
        "_decode_stage1",
        "_decode_merge",
        "_extend_attention_kernel",
    }
    spec = MATRICES[MATRIX]
    assert {c.arch for c in CASES} == set(spec["archs"])
    # Head dims 64 and 128 and GQA groups 3, 4 and 7 all reach the attention kernels.
    groups = {c.launch.constexprs.get("GROUP") for c in CASES} - {None}
    dims = {c.launch.constexprs.get("HEAD_DIM") for c in CASES} - {None}
    assert groups == {3, 4, 7} and dims == {64, 128}
    assert sum(not c.expect_fit for c in CASES) == 1


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_compile(case, compiled):
    result = compiled[case.id]
    assert result["error"] is None, result["error"]
    if case.expect_fit:
        assert result["problems"] == [], result["describe"]
    else:  # the check must be able to fail: this one overflows Hopper's shared memory
        assert any("shared memory" in p for p in result["problems"]), result["describe"]
        assert result["shared"] > result["shared_limit"]
