"""The pytest sections of benchmarks/gpu_check.py: which test files each runs, and their results
read back from pytest's JUnit report (so a collection error is counted, never lost)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from baton.bench.import_check import ABSENT


def module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def conftests(files: list[Path], root: Path) -> list[Path]:
    """The conftest.py files pytest loads for `files`, outermost first."""
    found = []
    for f in files:
        for d in reversed(f.relative_to(root).parents):
            c = root / d / "conftest.py"
            if c.exists() and c not in found:
                found.append(c)
    return found


def top_imports(path: Path) -> set[str]:
    """Top-level packages a test module imports when it is collected (outside functions)."""
    tops, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
        elif isinstance(node, ast.If | ast.Try | ast.With | ast.ExceptHandler):
            todo.extend(ast.iter_child_nodes(node))
    return tops


# Compile checks for targets without a GPU: `make compile-check` runs them; on the GPU the
# kernel tests compile and run every kernel for real.
CPU_ONLY = ("test_compile.py",)


def kernel_test_files(root: Path) -> list[Path]:
    files = (root / "tests" / "kernels").glob("test_*.py")
    return sorted(f for f in files if f.name not in CPU_ONLY)


def gpu_test_files(root: Path, allowed: set[str]) -> tuple[list[Path], dict[str, str]]:
    """Test files outside tests/kernels with gpu-marked tests, and those left out with why: the
    ones that import, when collected, a package the GPU machine lacks."""
    files, excluded = [], {}
    for f in sorted((root / "tests").rglob("test_*.py")):
        if f.is_relative_to(root / "tests" / "kernels"):
            continue  # the kernels section runs these, gpu-marked ones included
        if not re.search(r"pytest\.mark\.gpu|pytestmark\s*=.*\bgpu\b", f.read_text()):
            continue
        bad = sorted(
            t
            for t in top_imports(f)
            if t in ABSENT or not (t in sys.stdlib_module_names or t in allowed)
        )
        if bad:
            excluded[str(f.relative_to(root))] = f"imports {', '.join(bad)}: not on the GPU machine"
        else:
            files.append(f)
    return files, excluded


def junit_summary(path: Path) -> dict:
    """Counts and the first failures and errors (collection errors included) of a JUnit report."""
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {"error": "pytest wrote no report"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    counts["skipped"] = sum(int(s.get("skipped", 0)) for s in suites)
    problems = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            for el in case.findall(kind):
                # the message, and the traceback's last line (a collection error's only detail)
                lines = [el.get("message") or "", *(el.text or "").strip().splitlines()[-1:]]
                msg = " | ".join(x.strip() for x in lines if x.strip())[:400]
                problems.append(f"{kind}: {case.get('classname')}::{case.get('name')}: {msg}")
    return {**counts, "problems": problems[:50]}


def run_pytest(files: list[Path], extra: list[str], junit: Path, root: Path) -> dict:
    """pytest in this process (cwd: the repository); passed when it exits 0."""
    import pytest

    args = ["-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}", *extra]
    rc = int(pytest.main([*args, *(str(f.relative_to(root)) for f in files)]))
    return {"pytest_rc": rc, "junit": str(junit), **junit_summary(junit), "passed": rc == 0}
