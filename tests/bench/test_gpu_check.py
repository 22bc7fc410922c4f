"""benchmarks/gpu_check.py on CPU: its dry run passes on a simulated bare GPU machine (no baton
installed, none of the HTTP, ZeroMQ, GGUF or hypothesis packages), and its import check can fail."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from baton.bench.gpu_tests import gpu_test_files
from baton.bench.import_check import allowed_top_levels

ROOT = Path(__file__).resolve().parents[2]

# Started in every interpreter through PYTHONPATH: the finders already installed no longer find
# these packages, nor `baton` itself (gpu_check must map it from pyproject.toml).
BARE_MACHINE = textwrap.dedent(
    """
    import sys

    HIDDEN = {"fastapi", "uvicorn", "zmq", "gguf", "hypothesis"}


    class Hide:
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN or name == "baton":
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)


    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    """
)


def run(args: list[str], tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BARE_MACHINE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw
    )


def test_the_simulated_machine_lacks_what_it_should(tmp_path):
    code = "import importlib.util as u; print([u.find_spec(m) for m in ('zmq', 'baton')])"
    r = run(["-c", code], tmp_path, timeout=60)
    assert r.stdout.strip() == "[None, None]", r.stderr


def test_pythons_the_sections_start_import_baton_on_a_bare_gpu_machine(tmp_path):
    from baton.bench.import_check import import_path

    gpu_check = import_path(ROOT / "benchmarks" / "gpu_check.py")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "sitecustomize.py").write_text(BARE_MACHINE)
    (tmp_path / "boot").mkdir()
    env = gpu_check.bootstrap_env(tmp_path / "boot")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "boot"), str(tmp_path / "bare")])
    code = (
        "import sys, importlib.util as u, baton.server.config as c; "
        "print(u.find_spec('zmq'), type(sys.meta_path[0]).__name__, c.__file__)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.stdout.split() == ["None", "PackageDirFinder", str(ROOT / "server" / "config.py")], (
        r.stdout + r.stderr
    )


@pytest.mark.slow
def test_dry_run_passes_on_a_bare_gpu_machine(tmp_path):
    r = run(["benchmarks/gpu_check.py", "--dry-run"], tmp_path, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "baton: mapped from pyproject.toml" in out
    assert out.count("modules: ok") == 5 and "dry run: ok" in out
    assert "left out tests/server/wire/test_kv_blocks.py: imports zmq" in out


def test_import_check_refuses_what_the_gpu_machine_lacks():
    code = textwrap.dedent(
        """
        from pathlib import Path
        from baton.bench.import_check import check_imports

        root = Path.cwd()
        refused, _ = check_imports(["zmq"], root)
        assert [r.split(":")[0] for r in refused] == ["zmq"], refused
        refused, _ = check_imports(["baton.server.api.app"], root)  # baton code importing fastapi
        want = "fastapi: not on the GPU machine (imported by baton."
        assert any(r.startswith(want) for r in refused), refused
        refused, _ = check_imports(["no_such_module_here"], root)
        assert refused and "cannot import" in refused[0], refused
        assert check_imports(["json", "numpy", "baton.scheduler.batcher"], root)[0] == []
        print("ok")
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.stdout.strip() == "ok", r.stdout + r.stderr


def test_gpu_tests_leave_out_files_importing_missing_packages():
    files, excluded = gpu_test_files(ROOT, allowed_top_levels())
    names = {str(f.relative_to(ROOT)) for f in files}
    assert "tests/server/test_cuda_graph.py" in names
    assert not any(n.startswith("tests/kernels/") for n in names)
    assert "zmq" in excluded["tests/server/wire/test_kv_blocks.py"]
