"""Baton across hosts: router, prefill and decode each in their own network namespace, joined by
veth links to a bridge, talking TCP over it. Requests are served across the hosts; then the
decode host's link is cut: the stream in flight ends cleanly with an error event, new requests
get 503, and the router reports the worker dead. With the link back, the worker returns.

Needs root and iproute2; skipped with the reason where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from baton import SamplingParams
from baton.bench.cluster import CPU_LINEAR

pytestmark = pytest.mark.slow

SUBNET = "10.231.77"  # the test hosts' own addresses, on a bridge this test makes
HOSTS = {"router": 1, "prefill": 2, "decode": 3}
WORKER = ["--max-model-len", "2048", "--device", "cpu"]
WORKER += ["--dtype", "float32", "--kv-cache-gib", "0.1", "--max-num-batched-tokens", "256"]
WORKER += ["--cpu-linear", CPU_LINEAR]


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class Hosts:
    """Network namespaces with one veth each on a bridge in this (the client's) namespace."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.bridge = f"btn{tag}"
        self.ns = {name: f"baton-{name}-{tag}" for name in HOSTS}
        self.veth = {name: f"bt{tag}{i}" for name, i in HOSTS.items()}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = Path(tempfile.mkdtemp(prefix="baton-hosts-"))

    def addr(self, name: str) -> str:
        return f"{SUBNET}.{HOSTS[name]}"

    def up(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for name, ns in self.ns.items():
            sh("ip", "netns", "add", ns)
            sh(
                "ip",
                "link",
                "add",
                self.veth[name],
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            sh("ip", "link", "set", self.veth[name], "master", self.bridge, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.addr(name)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def cut(self, name: str, up: bool = False) -> None:
        sh("ip", "link", "set", self.veth[name], "up" if up else "down")

    def start(self, name: str, *args: str) -> None:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (kept open with the process)
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[name], sys.executable, "-m", "baton.server.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "BATON_LOG_LEVEL": "INFO"},
        )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def down(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@pytest.fixture(scope="module")
def hosts():
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed: no network namespaces here")
    h = Hosts()
    try:
        h.up()
    except subprocess.CalledProcessError as e:
        h.down()
        pytest.skip(f"cannot make network namespaces here ({' '.join(e.cmd)}: {e.stderr.strip()})")
    try:
        yield h
    finally:
        h.down()


def workers(url: str) -> dict[str, dict]:
    return {w["id"]: w for w in httpx.get(url + "/workers", timeout=10).json()}


def wait_for(pred, timeout: float, what: str, hosts: Hosts) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{hosts.log(n)}" for n in hosts.procs)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.2)


def test_requests_cross_hosts_and_a_cut_link_fails_cleanly(hosts, cut_model, cut_llm):
    router = hosts.addr("router")
    url = f"http://{router}:8000"
    control = f"tcp://{router}:8001"
    hosts.start(
        "router", "router", "--host", router, "--port", "8000", "--control", control,
        "--model", cut_model, "--max-model-len", "2048", "--heartbeat-timeout", "3",
    )  # fmt: skip
    hosts.start(
        "prefill", "worker", "--role", "prefill", "--router", control, "--worker-id", "p0",
        "--model", cut_model, *WORKER,
    )  # fmt: skip
    hosts.start(
        "decode", "worker", "--role", "decode", "--router", control, "--worker-id", "d0",
        "--kv-host", hosts.addr("decode"), "--kv-port", "8003", "--model", cut_model, *WORKER,
    )  # fmt: skip

    def ready() -> bool:
        try:
            ws = workers(url)
        except httpx.HTTPError:
            return False
        return {n: w["state"] for n, w in ws.items()} == {"p0": "ready", "d0": "ready"}

    wait_for(ready, 180, "both workers to register across hosts", hosts)
    prompt = [5, 17, 230, 1200, 77, 9, 311, 64, 2048, 15]
    expected = (
        cut_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
        .outputs[0]
        .text
    )
    body = {"model": cut_model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    body["ignore_eos"] = True
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected  # KV went prefill host -> decode host
    assert workers(url)["d0"]["served"] == 1

    # A long stream runs on the decode host when its link goes down.
    events, cut_at = [], []
    long = {**body, "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as s:
        for line in s.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[6:]))
            if len(events) == 5:
                hosts.cut("decode")
                cut_at.append(time.monotonic())
    assert cut_at and "error" in events[-1], events[-3:]
    assert time.monotonic() - cut_at[0] < 30  # noticed by heartbeats, never a hang
    assert events[-1]["error"]["code"] == "no_worker_available"
    assert workers(url)["d0"]["state"] == "dead"
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"], r.text

    # The link back: the worker is told to register again, and serves.
    hosts.cut("decode", up=True)
    wait_for(ready, 60, "the decode worker to come back", hosts)
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
