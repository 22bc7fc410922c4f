"""Which imports a bare GPU machine can satisfy (benchmarks/gpu_check.py --dry-run).

The machine has torch, triton, transformers, msgpack, xxhash, numpy and pytest, and what they
require; nothing else can be installed. After importing what a section imports, every module that
appeared is looked at: one known absent there (fastapi, uvicorn, zmq, gguf, hypothesis,
llguidance) is refused wherever it came from; any other outside the allowed packages is refused
when this repository's code asked for it, and only noted when an allowed package did
(transformers probes for optional packages and does without them).
"""

from __future__ import annotations

import collections
import importlib
import importlib.abc
import importlib.util
import re
import sys
import sysconfig
from pathlib import Path

ALLOWED = ("torch", "triton", "transformers", "msgpack", "xxhash", "numpy", "pytest")
ABSENT = ("fastapi", "uvicorn", "zmq", "gguf", "hypothesis", "llguidance")
FIRST_PARTY = ("baton", "tests")


def _canon(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def allowed_top_levels() -> set[str]:
    """Import names of the allowed distributions and of all they require (extras left out)."""
    from importlib import metadata

    seen, todo = set(), list(ALLOWED)
    while todo:
        name = _canon(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in reqs:
            spec, _, marker = req.partition(";")
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
            if m and "extra" not in marker:
                todo.append(m.group(1))
    tops = set(ALLOWED) | set(FIRST_PARTY)
    for top, dists in metadata.packages_distributions().items():
        if any(_canon(d) in seen for d in dists):
            tops.add(top)
    return tops - set(ABSENT)


def _third_party_dirs() -> list[Path]:
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    dirs += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if sys.prefix != sys.base_prefix:
        dirs.append(sys.prefix)  # a virtual environment inside the repository
    return [Path(d).resolve() for d in dirs]


def is_first_party(module: str, filename: str | None, root: Path) -> bool:
    """Code of this repository (baton, its tests, its scripts), not a package installed in it."""
    if module.split(".")[0] in FIRST_PARTY:
        return True
    if not filename or filename.startswith("<"):
        return False
    p = Path(filename).resolve()
    return p.is_relative_to(root) and not any(p.is_relative_to(d) for d in _third_party_dirs())


class ImportWatch(importlib.abc.MetaPathFinder):
    """Remembers which modules asked for each top-level package (it finds nothing itself)."""

    def __init__(self) -> None:
        self.importers: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)

    def find_spec(self, fullname, path=None, target=None):
        if "." not in fullname:
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(
                ("importlib", "_frozen_importlib")
            ):
                frame = frame.f_back
            if frame is not None:
                who = (frame.f_globals.get("__name__", "?"), frame.f_code.co_filename)
                self.importers[fullname].add(who)
        return None


def _is_stdlib(top: str) -> bool:
    if top in sys.stdlib_module_names or top.startswith("_sysconfigdata"):
        return True
    origin = getattr(getattr(sys.modules.get(top), "__spec__", None), "origin", None)
    if origin in ("built-in", "frozen"):
        return True
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    return (
        bool(origin) and "-packages" not in origin and Path(origin).resolve().is_relative_to(stdlib)
    )


def import_path(path: Path):
    """Import a script as a module under a name of its own (its folder must be on sys.path)."""
    name = f"_script_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def check_imports(
    modules: list[str], root: Path, allowed: set[str] | None = None
) -> tuple[list[str], list[str]]:
    """Import `modules` (names, or paths of scripts ending in .py) and judge every module that
    appeared. Returns (refusals, notes); a module that fails to import is a refusal too."""
    allowed = allowed_top_levels() if allowed is None else allowed
    before = set(sys.modules)
    watch = ImportWatch()
    sys.meta_path.insert(0, watch)
    refusals, notes = [], []
    try:
        for name in modules:
            try:
                if name.endswith(".py"):
                    import_path(Path(name))
                else:
                    importlib.import_module(name)
            except Exception as e:  # a missing package or a broken module
                refusals.append(f"{name}: cannot import ({type(e).__name__}: {e})")
    finally:
        sys.meta_path.remove(watch)
    for top in sorted({m.split(".")[0] for m in set(sys.modules) - before}):
        file = getattr(sys.modules.get(top), "__file__", None)
        if _is_stdlib(top) or top in allowed or is_first_party(top, file, root):
            continue
        who = watch.importers.get(top, set())
        if not who and top not in ABSENT:
            continue  # put in sys.modules by an extension or a generator, never imported
        ours = sorted(m for m, f in who if is_first_party(m, f, root))
        everyone = ", ".join(sorted(m for m, _ in who)) or "?"
        if top in ABSENT or ours:
            refusals.append(
                f"{top}: not on the GPU machine (imported by {', '.join(ours) or everyone})"
            )
        else:
            notes.append(f"{top}: optional, imported by {everyone}")
    return refusals, notes
