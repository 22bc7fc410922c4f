"""The sections of benchmarks/gpu_check.py: what each runs on the GPU machine, and what each
imports (its dry run imports exactly that). `root` is the repository."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUDGET_S = 235  # the whole check, on one H200


def _need_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: this check runs on a GPU machine (see --dry-run)")


def run_kernels(root: Path, out_dir: Path) -> dict:
    from baton.bench.gpu_tests import kernel_test_files, run_pytest

    _need_cuda()
    junit = out_dir / "gpu_check_kernels.junit.xml"
    return run_pytest(kernel_test_files(root), [], junit, root)


def run_gpu_tests(root: Path, out_dir: Path) -> dict:
    from baton.bench.gpu_tests import gpu_test_files, run_pytest
    from baton.bench.import_check import allowed_top_levels

    _need_cuda()
    files, excluded = gpu_test_files(root, allowed_top_levels())
    res = {"files": [str(f.relative_to(root)) for f in files], "excluded": excluded}
    if not files:
        return {**res, "passed": False, "error": "no gpu-marked test files found"}
    extra = ["-m", "gpu", "--continue-on-collection-errors"]
    res.update(run_pytest(files, extra, out_dir / "gpu_check_gpu-tests.junit.xml", root))
    if not res.get("tests"):
        res.update(passed=False, error="no gpu-marked test ran")
    elif res.get("skipped"):
        res.update(passed=False, error="gpu-marked tests were skipped on a GPU machine")
    return res


def run_greedy(root: Path, out_dir: Path) -> dict:
    _need_cuda()
    from baton.bench.gpu_equivalence import greedy_vs_transformers

    with tempfile.TemporaryDirectory() as tmp:
        return greedy_vs_transformers(Path(tmp))


def run_graphs(root: Path, out_dir: Path) -> dict:
    _need_cuda()
    from baton.bench.gpu_equivalence import graphs_vs_eager

    with tempfile.TemporaryDirectory() as tmp:
        return graphs_vs_eager(Path(tmp))


BENCH_ARGS = [
    *("--prefill-lens", "4096"),
    *("--batches", "1", "64", "--contexts", "1024", "4096"),
    *("--step-batches", "1", "64", "--step-context", "1024"),
]


def bench_command(root: Path, out_dir: Path) -> list[str]:
    out = ["--output-dir", str(out_dir), "--output", str(out_dir / "kernels_bench.json")]
    return [sys.executable, str(root / "benchmarks" / "kernels.py"), *out, *BENCH_ARGS]


def bench_details(root: Path, out_dir: Path) -> dict:
    path = out_dir / "kernels_bench.json"
    if not path.exists():
        return {"error": "kernels.py wrote no results"}
    data = json.loads(path.read_text())
    details: dict = {"results": str(path), "targets": {}, "errors": {}}
    for name, sec in data.items():
        if isinstance(sec, dict) and "target" in sec:
            details["targets"][name] = sec["target"]
        if isinstance(sec, dict) and "error" in sec:
            details["errors"][name] = sec["error"][-500:]
    return details


@dataclass(frozen=True)
class Section:
    about: str
    cap_s: int  # at most this much of the budget
    # (root, out_dir) -> its result, run in a child process of gpu_check.py, or
    child: Callable[[Path, Path], dict] | None = None
    command: Callable[[Path, Path], list[str]] | None = None  # a command of its own,
    details: Callable[[Path, Path], dict] | None = None  # and what that command left behind


SECTIONS = {
    "kernels": Section("tests/kernels compiled on the GPU (no interpreter)", 75, run_kernels),
    "gpu-tests": Section("the gpu-marked tests outside tests/kernels", 45, run_gpu_tests),
    "greedy": Section("greedy tokens against transformers, fp32 and bf16", 35, run_greedy),
    "graphs": Section("CUDA-graph replays against eager steps, fp32 and bf16", 30, run_graphs),
    "bench": Section(
        "benchmarks/kernels.py: prefill, decode, the Llama-3-8B step",
        BUDGET_S,
        command=bench_command,
        details=bench_details,
    ),
}


def section_modules(name: str, root: Path) -> list[str]:
    """What a section imports (the dry run imports exactly these)."""
    from baton.bench.gpu_tests import conftests, gpu_test_files, kernel_test_files, module_name
    from baton.bench.import_check import allowed_top_levels, import_path

    if name in ("kernels", "gpu-tests"):
        if name == "kernels":
            files = kernel_test_files(root)
        else:
            files = gpu_test_files(root, allowed_top_levels())[0]
        return ["pytest", *(module_name(f, root) for f in conftests(files, root) + files)]
    if name in ("greedy", "graphs"):
        return ["baton.bench.gpu_equivalence"]
    script = root / "benchmarks" / "kernels.py"  # its own imports, then those its sections make
    return [str(script), *import_path(script).RUNTIME_MODULES]
