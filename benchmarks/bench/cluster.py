"""A router and its workers as separate real processes on loopback, so a test or a soak can kill,
stop or drain any one of them, or restart the router, and watch what the others do.

Each process logs to its own file under `log_dir` (a pipe nobody reads would fill and block it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MODEL = "smollm2"
BASE = ["--max-model-len", "2048"]
# NOTE: pinned rather than timed on the host, so every worker (and an offline reference engine
# given the same plan) rounds alike: greedy text can be compared across them.
CPU_LINEAR = "mkl-packed"
WORKER = [
    "--cpu-linear",
    CPU_LINEAR,
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--max-num-batched-tokens",
    "256",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Cluster:
    def __init__(
        self,
        mode: str = "disagg",
        router_args: tuple[str, ...] = (),
        log_dir: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        wait_router: bool = True,
        model: str = MODEL,
    ) -> None:
        self.mode = mode
        self.model = model  # an alias or a folder: what workers load and requests name
        self.port = free_port()
        self.control = f"tcp://127.0.0.1:{free_port()}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.router_args = list(router_args)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="baton-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "BATON_LOG_LEVEL": "INFO", **(env or {})}
        self.router: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self._starts = 0
        self.start_router(wait=wait_router)

    @classmethod
    @contextlib.contextmanager
    def running(cls, workers: dict[str, tuple[str, ...]], mode: str = "disagg", **kw):
        """A cluster whose `workers` (name -> (role, *flags)) are ready; closed on the way out."""
        # NOTE: router and workers load side by side; a worker keeps knocking until it answers.
        c = cls(mode, wait_router=False, **kw)
        try:
            for name, (role, *flags) in workers.items():
                c.add_worker(name, role, *flags, wait=False)
            c.wait_router()
            for name in workers:
                c.wait_worker(name, "ready")
            yield c
        finally:
            c.close()

    # ---- processes ----------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None) -> subprocess.Popen:
        self._starts += 1
        path = self.log_dir / f"{name}.{self._starts}.log"
        with open(path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "baton.server.cli", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                env={**self.env, **(env or {})},
            )
        proc.log_path = path
        return proc

    def log(self, proc: subprocess.Popen, tail: int = 4000) -> str:
        return proc.log_path.read_text(errors="replace")[-tail:]

    def start_router(self, env: dict[str, str] | None = None, wait: bool = True) -> None:
        args = ["router", "--port", str(self.port), "--control", self.control]
        # NOTE: every prompt is handed off unless a caller's router_args say otherwise, so the
        # handoff paths are what the fault tests and benchmarks exercise.
        args += ["--mode", self.mode, "--heartbeat-timeout", "3"]
        args += ["--max-local-prefill-tokens", "0", "--max-local-turn-tokens", "0"]
        args += ["--model", self.model, *BASE, *self.router_args]
        self.router = self._spawn("router", args, env)
        if wait:
            self.wait_router()

    def wait_router(self) -> None:
        """Until the router has bound its control socket and answers HTTP."""
        self._wait_line(self.router, "router", "workers connect to", 120)
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(self.url + "/version", timeout=2)
                return
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "router did not answer"
                time.sleep(0.1)

    def add_worker(
        self, name: str, role: str, *extra: str, wait: bool = True, env: dict | None = None
    ) -> int:
        args = ["worker", "--role", role, "--router", self.control, "--worker-id", name]
        args += ["--model", self.model, *BASE, *WORKER, "--kv-cache-gib", "0.1", *extra]
        proc = self._spawn(name, args, env)
        self.workers[name] = proc
        if wait:
            self.wait_worker(name, "ready")
        return proc.pid

    def _wait_line(self, proc, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in proc.log_path.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log(proc)}")
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not say {text!r}:\n{self.log(proc)}")

    def signal(self, name: str, sig: int) -> None:
        self.workers[name].send_signal(sig)

    def kill(self, name: str) -> None:
        proc = self.workers[name]
        proc.kill()
        proc.wait(timeout=10)

    def kill_router(self) -> None:
        self.router.kill()
        self.router.wait(timeout=10)

    def close(self) -> None:
        procs = [p for p in [*self.workers.values(), self.router] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ---- what the router says -----------------------------------------------------------------

    def worker_states(self) -> dict[str, dict]:
        return {w["id"]: w for w in httpx.get(self.url + "/workers", timeout=10).json()}

    def wait_worker(self, name: str, state: str | None, timeout: float = 120) -> None:
        """Until the router lists `name` in `state` (None: until it no longer lists it)."""
        deadline = time.monotonic() + timeout
        while True:
            w = self.worker_states().get(name)
            if (w is None and state is None) or (w is not None and w["state"] == state):
                return
            proc = self.workers.get(name)
            if state == "ready" and proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log(proc)}")
            assert time.monotonic() < deadline, (name, state, w)
            time.sleep(0.1)

    def wait_idle(self, timeout: float = 30) -> dict[str, dict]:
        """Until every live worker has nothing running, waiting, assigned or held in KV."""
        deadline = time.monotonic() + timeout
        while True:
            ws = self.worker_states()
            live = [w for w in ws.values() if w["state"] != "dead"]
            if all(
                w["running"] == 0
                and w["waiting"] == 0
                and w["assigned"] == 0
                and w["num_free_blocks"] == w["num_blocks"]
                for w in live
            ):
                return ws
            assert time.monotonic() < deadline, ws
            time.sleep(0.2)

    def serving(self, role: str) -> str:
        """The worker of `role` that has requests assigned now."""
        busy = [
            w["id"] for w in self.worker_states().values() if w["role"] == role and w["assigned"]
        ]
        assert len(busy) == 1, self.worker_states()
        return busy[0]

    # ---- requests -----------------------------------------------------------------------------

    def body(self, prompt: list[int], max_tokens: int, **kw) -> dict:
        return {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            **kw,
        }

    def complete(self, prompt: list[int], max_tokens: int, timeout: float = 120) -> str:
        """The text of one greedy completion."""
        r = httpx.post(
            self.url + "/v1/completions", json=self.body(prompt, max_tokens), timeout=timeout
        )
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    def stream(self, prompt: list[int], max_tokens: int, on_chunk=None, timeout: float = 120, **kw):
        """(text, error event or None) of one streamed greedy completion; `on_chunk(n)` is
        called after the n-th chunk with text arrives. `kw`: more fields of the body."""
        body = self.body(prompt, max_tokens, stream=True, **kw)
        text, chunks, error = "", 0, None
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=timeout) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    continue
                for c in event["choices"]:
                    text += c["text"]
                    chunks += bool(c["text"])
                if on_chunk is not None:
                    on_chunk(chunks)
        return text, error
