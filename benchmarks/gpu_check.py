"""The first run on a bare GPU machine, in one command: kernel tests compiled, the gpu-marked tests,
greedy tokens against transformers, CUDA-graph replays against eager steps, and the kernel
benchmarks. Each section runs in its own process, catches its own failure and writes its JSON
result as soon as it ends; the exit code is nonzero if any section failed.

Runs with the machine's own python3 (torch, triton, transformers, msgpack, xxhash, numpy, pytest;
no fastapi, uvicorn, pyzmq, gguf or hypothesis, nothing installable): when `baton` is not
installed, its packages are mapped from pyproject.toml's `[tool.setuptools] package-dir`.

    python3 benchmarks/gpu_check.py                         # every section, under 4 minutes
    python3 benchmarks/gpu_check.py --sections greedy graphs
    python3 benchmarks/gpu_check.py --dry-run               # the plan and an import check, no CUDA

Results go to --out-dir, else $OUT, else benchmarks/results/gpu_check/.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.abc
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
DEFAULT_OUT = BENCH / "results" / "gpu_check"


# ---- baton without pip ---------------------------------------------------------------------------


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """pyproject.toml's package-dir: import name -> source folder."""
    with open(root / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {name: root / rel for name, rel in mapping.items()}


class PackageDirFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped packages in their folders; their subpackages are found the usual way."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs

    def find_spec(self, fullname, path=None, target=None):
        d = self.dirs.get(fullname)
        if d is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, d / "__init__.py", submodule_search_locations=[str(d)]
        )


def install_baton(root: Path = ROOT) -> bool:
    """Make `baton` importable when it is not installed; True if it had to."""
    try:
        import baton  # noqa: F401

        return False
    except ImportError:
        pass
    sys.meta_path.insert(0, PackageDirFinder(package_dirs(root)))
    importlib.invalidate_caches()
    return True


# Put first on PYTHONPATH, it makes every python the sections start (pytest, the subprocesses of
# tests) import baton as this script does, after the sitecustomize it shadows, if any.
SITECUSTOMIZE = """\
import importlib.machinery, importlib.util, os, sys

_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
_spec = importlib.util.spec_from_file_location("_baton_bootstrap", {script!r})
_boot = sys.modules["_baton_bootstrap"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_boot)
_boot.install_baton()
"""


def bootstrap_env(folder: Path) -> dict[str, str]:
    """The environment for the sections' processes: TRITON_INTERPRET unset (kernels compile for
    the GPU), and a sitecustomize in `folder` that maps baton in every python they start."""
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(script=str(Path(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    return env


def child_command(name: str, out_dir: Path, result: Path) -> list[str]:
    me = str(Path(__file__).resolve())
    return [sys.executable, me, "--child", name, "--out-dir", str(out_dir), "--result", str(result)]


# ---- running -------------------------------------------------------------------------------------


def _stream(proc: subprocess.Popen, name: str, tail: collections.deque) -> None:
    for line in proc.stdout:
        print(f"[{name}] {line}", end="", flush=True)
        tail.append(line)


def run_section(name: str, out_dir: Path, limit_s: float, env: dict[str, str]) -> dict:
    from baton.bench.gpu_sections import SECTIONS

    sec = SECTIONS[name]
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = sec.command(ROOT, out_dir) if sec.command else child_command(name, out_dir, result)
        tail: collections.deque = collections.deque(maxlen=40)
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # so a timeout ends the section's whole process group
        )
        reader = threading.Thread(target=_stream, args=(proc, name, tail), daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        reader.join(timeout=5)
        if sec.details:
            details = sec.details(ROOT, out_dir)
        elif result.exists():
            details = json.loads(result.read_text())
        else:
            details = {"error": "the section wrote no result"}
    passed = rc == 0 and not timed_out and details.get("passed", True) is not False
    return {
        "section": name,
        "about": sec.about,
        "passed": passed,
        "seconds": round(time.monotonic() - start, 1),
        "limit_s": round(limit_s),
        "timed_out": timed_out,
        "rc": rc,
        "command": " ".join(cmd),
        "details": details,
        "output_tail": "".join(tail)[-4000:],
    }


def run_child(name: str, out_dir: Path, result: Path) -> int:
    """A section's body, in its own process: catches its failure and writes its result."""
    from baton.bench.gpu_sections import SECTIONS

    # NOTE: not this script's folder on sys.path: transformers probes for a package named
    # `kernels`, and would import benchmarks/kernels.py as that.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
    try:
        res = SECTIONS[name].child(ROOT, out_dir)
    except Exception:
        res = {"passed": False, "error": traceback.format_exc()[-3000:]}
    result.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0 if res.get("passed") else 1


def machine_facts() -> dict:
    from importlib import metadata

    facts = {"python": platform.python_version(), "host": platform.node()}
    for dist in ("torch", "triton", "transformers"):
        try:
            facts[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            facts[dist] = None
    try:
        q = "--query-gpu=name,driver_version,memory.total"
        smi = subprocess.run(
            ["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        facts["gpu"] = smi.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        facts["gpu"] = None
    return facts


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def _why(res: dict) -> str:
    """One line on why a section failed."""
    if res.get("timed_out"):
        return f"timed out after {res['limit_s']} s"
    d = res.get("details", {})
    err = res.get("error") or d.get("error")
    if err:
        err = err.strip().splitlines()[-1]
        last = next((x for x in reversed(res.get("output_tail", "").splitlines()) if x), "")
        return (err if last in err else f"{err} ({last.strip()})")[:300]
    if d.get("problems"):
        counts = f"{d.get('failures', 0)} failed, {d.get('errors', 0)} errors"
        return f"{counts}: {d['problems'][0]}"[:300]
    failed = [k for k, v in d.items() if isinstance(v, dict) and v.get("passed") is False]
    return f"failed: {', '.join(failed)}" if failed else f"exit code {res.get('rc')}"


def run_all(names: list[str], out_dir: Path, budget_s: float) -> int:
    from baton.bench.gpu_sections import SECTIONS

    start = time.monotonic()
    boot = tempfile.TemporaryDirectory()
    env = bootstrap_env(Path(boot.name))
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"command": " ".join(sys.argv), "machine": machine_facts(), "sections": {}}
    for name in names:
        left = budget_s - (time.monotonic() - start)
        if left < 10:
            res = {"section": name, "passed": False, "error": "skipped: the time budget ran out"}
        else:
            limit = min(left, SECTIONS[name].cap_s)
            print(f"== {name}: {SECTIONS[name].about} (at most {limit:.0f} s)")
            res = run_section(name, out_dir, limit, env)
        write_json(out_dir / f"gpu_check_{name}.json", res)
        summary["sections"][name] = {
            "passed": res["passed"],
            "seconds": res.get("seconds"),
            "why": None if res["passed"] else _why(res),
        }
        targets = res.get("details", {}).get("targets")
        if targets:  # performance goals: reported, never a failure of the check
            summary["sections"][name]["targets_met"] = {k: t["met"] for k, t in targets.items()}
        summary["passed"] = all(s["passed"] for s in summary["sections"].values())
        write_json(out_dir / "gpu_check.json", summary)
        print(f"== {name}: {'passed' if res['passed'] else 'FAILED'} in {res.get('seconds', 0)} s")
    for name, s in summary["sections"].items():
        why = "" if s["passed"] else f": {s['why']}"
        print(f"{name:>10}: {'passed' if s['passed'] else 'FAILED'} ({s['seconds']} s){why}")
        for target, met in s.get("targets_met", {}).items():
            print(f"{'':>12}target {target}: {({True: 'met', False: 'MISSED'}).get(met, 'n/a')}")
    print(f"results in {out_dir}")
    boot.cleanup()
    return 0 if summary["passed"] else 1


def dry_run(names: list[str], out_dir: Path, bootstrapped: bool) -> int:
    """Print the plan, then import what every section imports (no CUDA) and refuse what the GPU
    machine lacks."""
    from baton.bench.gpu_sections import SECTIONS, section_modules
    from baton.bench.gpu_tests import gpu_test_files
    from baton.bench.import_check import allowed_top_levels, check_imports

    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # nothing here may touch a GPU
    for p in (str(BENCH), str(ROOT)):  # the scripts' `common`, and tests.*
        if p not in sys.path:
            sys.path.insert(0, p)
    allowed = allowed_top_levels()
    print(f"baton: {'mapped from pyproject.toml' if bootstrapped else 'installed'}")
    print(f"results would go to {out_dir}")
    failed = False
    for name in names:
        sec = SECTIONS[name]
        if sec.command:
            cmd = sec.command(ROOT, out_dir)
        else:
            cmd = child_command(name, out_dir, Path("RESULT"))
        print(f"\n== {name}: {sec.about} (at most {sec.cap_s} s)\n   {' '.join(cmd)}")
        if name == "gpu-tests":
            for f, why in gpu_test_files(ROOT, allowed)[1].items():
                print(f"   left out {f}: {why}")
        try:
            modules = section_modules(name, ROOT)
        except Exception as e:
            modules, refusals = [], [f"listing its imports failed: {type(e).__name__}: {e}"]
        else:
            refusals, notes = check_imports(modules, ROOT, allowed)
            for n in notes:
                print(f"   note: {n}")
        print(f"   imports {len(modules)} modules: " + ("REFUSED" if refusals else "ok"))
        for r in refusals:
            print(f"   refused: {r}")
        failed |= bool(refusals)
    print("\ndry run: " + ("FAILED" if failed else "ok"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    bootstrapped = install_baton()
    from baton.bench.gpu_sections import BUDGET_S, SECTIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT") or DEFAULT_OUT))
    p.add_argument("--dry-run", action="store_true", help="plan and import check only, no CUDA")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="for all sections together")
    children = [n for n, s in SECTIONS.items() if s.child]
    p.add_argument("--child", choices=children, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out_dir = args.out_dir.resolve()
    if args.child:
        return run_child(args.child, out_dir, args.result)
    if args.dry_run:
        return dry_run(args.sections, out_dir, bootstrapped)
    return run_all(args.sections, out_dir, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
