"""Shared helpers for benchmark scripts: machine facts and result files."""

from __future__ import annotations

import json
from pathlib import Path

from baton.bench.machine import command_line, machine_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS_DIR", "machine_info", "save_result"]


def save_result(name: str, payload: dict, path: str | None = None) -> Path:
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command_line(),
        "machine": machine_info(),
        **payload,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out
