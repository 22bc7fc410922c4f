"""Shared helpers for benchmark scripts: machine facts, result files and a served Baton."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from baton.bench.machine import command_line, machine_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS_DIR", "machine_info", "save_result", "served"]


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


@contextlib.contextmanager
def served(
    args, mode: str, extra: Sequence[str] = (), env: dict[str, str] | None = None
) -> Iterator[str]:
    """`baton serve` in `mode` on a free port (model, device, dtype and KV size from `args`, then
    the `extra` flags); yields its base URL once it says it is listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "baton.server.cli", "serve", "--mode", mode, "--port", str(port)]
    cmd += ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
    cmd += ["--kv-cache-gib", str(args.kv_cache_gib), *extra]
    proc_env = {**os.environ, "BATON_LOG_LEVEL": "WARNING", **(env or {})}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=proc_env
    )
    lines: list[str] = []
    try:
        while True:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"baton serve --mode {mode} exited:\n" + "".join(lines[-30:]))
            lines.append(line)
            if "Baton listening" in line:
                break
        # NOTE: keep reading its output, or a full pipe would block the server on a log line.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
