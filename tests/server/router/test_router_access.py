"""`baton router` as a process: keys from a file and the environment guard what describes the
deployment; /health stays open; an unreadable key file stops it at start."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx

from tests.server.router.test_serve_e2e import free_port


def start_router(tmp_path, *flags: str, env: dict | None = None):
    port, control = free_port(), free_port()
    cmd = [sys.executable, "-m", "baton.server.cli", "router", "--port", str(port),
           "--control", f"tcp://127.0.0.1:{control}", *flags]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")} | (env or {})
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("router exited:\n" + "".join(lines))
        lines.append(line)
        if re.search(r"Baton listening", line):
            return proc, f"http://127.0.0.1:{port}", lines
    proc.kill()
    raise RuntimeError("router did not start:\n" + "".join(lines))


def code(url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url, headers=headers, timeout=10).status_code


def test_keys_from_a_file_and_the_environment(tmp_path):
    f = tmp_path / "api-key"
    f.write_text("file-key\n")
    proc, url, lines = start_router(
        tmp_path, "--api-key-file", str(f), env={"BATON_ADMIN_KEY": "env-admin"}
    )
    try:
        for path in ("/workers", "/metrics", "/openapi.json", "/docs"):
            assert code(url + path) == 401, path
            assert code(url + path, "file-key") == 401, path  # an admin key is set: only it
            assert code(url + path, "env-admin") == 200, path
        assert code(url + "/v1/models") == 401
        assert code(url + "/v1/models", "file-key") == 200
        assert code(url + "/health") == 503  # open (no worker yet), never 401
        assert code(url + "/version") == 200
        assert not any("file-key" in line or "env-admin" in line for line in lines)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_metrics_public_and_the_api_key_from_the_environment(tmp_path):
    proc, url, _ = start_router(tmp_path, "--metrics-public", env={"BATON_API_KEY": "k"})
    try:
        assert code(url + "/metrics") == 200
        assert code(url + "/workers") == 401 and code(url + "/workers", "k") == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_unreadable_key_file_stops_the_router_naming_the_flag(tmp_path):
    cmd = [sys.executable, "-m", "baton.server.cli", "router",
           "--api-key-file", str(tmp_path / "missing")]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "--api-key-file" in p.stderr and "Traceback" not in p.stderr
