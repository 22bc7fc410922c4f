"""End to end: `baton serve` as real processes on loopback, driven by the official openai client."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import zmq

from baton import SamplingParams
from baton.bench.cluster import CPU_LINEAR

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colours."}]
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "baton.server.cli", "serve", "--port", str(self.port)]
        cmd += ["--device", "cpu", "--dtype", "float32", "--kv-cache-gib", "0.1"]
        cmd += ["--cpu-linear", CPU_LINEAR, *args]
        env = {**os.environ, "BATON_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self.control = ""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited:\n" + "".join(self.lines))
            self.lines.append(line)
            if m := re.search(r"workers connect to (\S+)", line):
                self.control = m.group(1)
            if "Baton listening" in line:
                break
        else:
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "x"), **kw)

    def workers(self) -> list[dict]:
        return httpx.get(self.url + "/workers", timeout=10).json()

    def wait_idle(self, timeout: float = 20) -> list[dict]:
        """Until every worker reports nothing running, waiting or held in its KV cache."""
        deadline = time.monotonic() + timeout
        while True:
            ws = self.workers()
            if all(
                w["running"] == 0 and w["waiting"] == 0 and w["num_free_blocks"] == w["num_blocks"]
                for w in ws
                if w["state"] == "ready"
            ):
                return ws
            assert time.monotonic() < deadline, ws
            time.sleep(0.3)

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.workers()]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop `baton serve`; its workers must not outlive it, however it went."""
        pids = self.worker_pids()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        deadline = time.monotonic() + 20
        while (alive := [p for p in pids if running(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in alive:
            os.kill(p, signal.SIGKILL)
        assert not alive, f"workers {alive} outlived the server"


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def offline(smollm2):
    p = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    return {
        "completion": smollm2.generate([PROMPT], p)[0],
        "chat": smollm2.chat(CHAT, p)[0],
    }


def test_completion_equals_offline_engine_and_colocated(disagg, colocated, offline):
    want = offline["completion"]
    for server in (disagg, colocated):
        r = server.client().completions.create(
            model="smollm2", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
        )
        assert r.choices[0].text == want.text
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
        assert r.usage.completion_tokens == len(want.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert any(w["served"] for w in disagg.workers() if w["role"] == "decode")


def test_chat_streamed_equals_unstreamed_and_offline(disagg, offline):
    c = disagg.client()
    kw = {"model": "smollm2", "messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0}
    whole = c.chat.completions.create(**kw)
    assert whole.choices[0].message.content == offline["chat"].text
    chunks = list(
        c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_client_disconnect_frees_kv_on_both_sides(disagg):
    body = {
        "model": "smollm2",
        "prompt": PROMPT,
        "max_tokens": 400,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    with httpx.stream("POST", disagg.url + "/v1/completions", json=body, timeout=30) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break
    disagg.wait_idle()


def test_errors_have_openai_shape(disagg):
    c = disagg.client(max_retries=0)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smollm2", prompt="hi", max_tokens=10**6)
    assert "1000000" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="smollm2", prompt="hi", max_tokens=2, temperature=-1)


def test_malformed_frames_are_dropped_and_the_worker_lives_on(disagg):
    decode = next(w for w in disagg.workers() if w["role"] == "decode")
    ctx = zmq.Context()
    junk = [
        [b"\x00\x01garbage"],
        [b"\x81\xa1t\xa5Abort"],  # msgpack, but not a message
        [b"\xc1"],  # invalid msgpack byte
        [b"", b"", b""],
    ]
    for endpoint in (decode["kv_endpoint"], disagg.control):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        for frames in junk:
            s.send_multipart(frames)
        time.sleep(0.3)
        s.close()
    ctx.term()
    r = disagg.client().completions.create(model="smollm2", prompt=PROMPT, max_tokens=3)
    assert r.choices[0].text
    assert all(w["state"] == "ready" for w in disagg.workers())


def worker_proc(control: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "baton.server.cli", "worker", "--router", control]
    cmd += ["--device", "cpu", "--dtype", "float32", "--kv-cache-gib", "0.1"]
    cmd += ["--cpu-linear", CPU_LINEAR, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_idle_workers_use_almost_no_cpu(disagg):
    disagg.client().completions.create(model="smollm2", prompt=PROMPT, max_tokens=4)
    pids = disagg.worker_pids()
    time.sleep(0.5)  # the request's threads go to sleep
    before = [cpu_seconds(p) for p in pids]
    t0 = time.monotonic()
    time.sleep(3.0)
    elapsed = time.monotonic() - t0
    used = [(cpu_seconds(p) - b) / elapsed for p, b in zip(pids, before, strict=True)]
    # no thread spins while there is no work: under 2% of a core each (seen: ~0.2%)
    assert max(used) < 0.02, used


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_heartbeats_carry_each_workers_memory_to_the_routers_metrics(disagg):
    from tests.server.api.test_metrics import samples

    time.sleep(1.2)  # a heartbeat since any earlier test
    ws = [w for w in disagg.workers() if w["state"] == "ready"]
    m = samples(httpx.get(disagg.url + "/metrics", timeout=10).text)
    for w in ws:
        labels = (("role", w["role"]), ("worker", w["id"]))
        rss = m[("baton:worker_resident_memory_bytes", *labels)]
        assert rss == w["rss_bytes"] and rss > 200 << 20  # the model's weights at least
        assert abs(rss - rss_of(w["pid"])) < 64 << 20  # what the kernel says, a beat ago
        # the KV cache was written at start: all of it is resident (0.1 GiB, whole blocks)
        kv = m[("baton:worker_kv_cache_resident_bytes", *labels)]
        assert kv == w["kv_resident_bytes"] and 0.09 * 2**30 < kv <= 0.1 * 2**30
    assert m[("process_resident_memory_bytes",)] > 0


def test_incompatible_workers_are_refused(disagg):
    layout = worker_proc(disagg.control, "--role", "decode", "--block-size", "32")
    # its float32 rounding would differ from the pool's (whose plan /workers shows)
    plan = worker_proc(disagg.control, "--role", "decode", "--cpu-linear", "dense@1,onednn@4")
    out, _ = layout.communicate(timeout=120)
    assert layout.returncode != 0
    assert "refused" in out and "layout" in out
    out, _ = plan.communicate(timeout=120)
    assert plan.returncode != 0
    assert f"'dense@1,onednn@4' differs from the pool's '{CPU_LINEAR}'" in out
    assert f"start it with --cpu-linear {CPU_LINEAR}" in out
    workers = disagg.workers()
    assert len(workers) == 2
    for w in workers:
        assert w["cpu"]["linear"] == CPU_LINEAR and w["cpu"]["threads"] >= 1
        assert w["cpu"]["wait_policy"] in ("brief", "environment")


def test_worker_joins_a_running_server(disagg):
    # Twice the KV of the first decode worker, so placement (most free KV) must pick it.
    p = worker_proc(
        disagg.control, "--role", "decode", "--worker-id", "late-decode", "--kv-cache-gib", "0.2"
    )
    try:
        deadline = time.monotonic() + 120
        while not any(w["id"] == "late-decode" for w in disagg.workers()):
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.3)
        c = disagg.client()
        for _ in range(2):
            c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=3)
        late = next(w for w in disagg.workers() if w["id"] == "late-decode")
        assert late["served"] >= 1
    finally:
        p.terminate()
        p.wait(timeout=20)


def test_workers_stop_when_the_server_is_killed(cut_model):
    """SIGKILL leaves `baton serve` no chance to clean up: its workers notice on their own."""
    s = Server("--mode", "colocated", "--model", cut_model)
    assert s.workers()[0]["state"] == "ready"
    s.stop(signal.SIGKILL)
