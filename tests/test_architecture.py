"""ARCHITECTURE.md's request path names real code: every `module:name` in it imports."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "ARCHITECTURE.md"
REF = re.compile(r"`(baton(?:\.\w+)+):([\w.]+)`")


def test_every_function_the_architecture_names_exists():
    refs = REF.findall(DOC.read_text())
    assert len(refs) >= 25  # the request path is written with its functions
    missing = []
    for module, name in refs:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                missing.append(f"{module}:{name}")
                break
    assert not missing, missing


def test_the_request_path_stays_under_25_steps():
    text = DOC.read_text()
    path = text.split("## One streamed chat request")[1].split("\n## ")[0]
    steps = re.findall(r"^(\d+)\. ", path, flags=re.M)
    assert 0 < len(steps) < 25
