"""A scripted FakeCluster behind the real app, served by uvicorn on loopback in a thread."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from dataclasses import dataclass, field, fields

import httpx
import openai
import pytest
import uvicorn

from baton.scheduler.sampling_params import SamplingParams
from baton.server.api.app import build_app
from baton.server.api.auth import AccessConfig
from baton.server.api.cluster import NoWorkerAvailable, TokenEvent
from baton.server.api.metrics import Metrics
from baton.server.wire import codec
from baton.server.wire import messages as m
from baton.server.wire.params import params_to_dict

MODEL = "fake-model"
ALIAS = "fake"
TEXT = " Paris is the capital of France, and 🦜 is a parrot."


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from baton.server.loader import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2").hf_dir)


def logprob_entry(i: int, tid: int, k: int) -> list:
    top = [[tid, -0.5 - i], [tid + 1, -2.0 - i], [tid + 2, -3.0 - i]][:k]
    return [tid, -0.5 - i, top]


@dataclass
class Script:
    """What the cluster emits for every request: `tokens`, `per_event` at a time."""

    tokens: list[int]
    finish_reason: str = "stop"  # when the tokens run out before max_tokens
    stop_reason: int | None = None
    per_event: int = 1
    delay: float = 0.0  # before each event
    fail_at: int | None = None  # raise RuntimeError instead of this event
    cached: int = 0


@dataclass
class FakeCluster:
    tokenizer: object
    script: Script
    model_name: str = MODEL
    max_model_len: int = 128
    healthy: tuple[bool, str] = (True, "")
    unavailable: str | None = None  # raise NoWorkerAvailable(role) from generate
    unavailable_after: int = 0  # ... once this many requests were placed
    fail_on_generate: bool = False
    calls: list[tuple[str, list[int], SamplingParams]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)  # streams whose generator finished
    worker_list: list[dict] = field(
        default_factory=lambda: [
            {"id": "p0", "role": "prefill", "running": 1, "waiting": 2, "kv_usage": 0.25},
            {
                "id": "d0",
                "role": "decode",
                "running": 3,
                "waiting": 0,
                "kv_usage": 0.5,
                "rss_bytes": 700 << 20,
                "kv_resident_bytes": 256 << 20,
            },  # fmt: skip
        ]
    )

    @classmethod
    def scripted(cls, tokenizer) -> FakeCluster:
        """Answers every request with TEXT and then EOS."""
        tokens = tokenizer.encode(TEXT, add_special_tokens=False) + [tokenizer.eos_token_id]
        return cls(tokenizer, Script(tokens, stop_reason=tokenizer.eos_token_id))

    def reset(self) -> None:
        fresh = self.scripted(self.tokenizer)
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))

    def workers(self) -> list[dict]:
        return self.worker_list

    def health(self) -> tuple[bool, str]:
        return self.healthy

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def generate(self, request_id, prompt_token_ids, params):
        if self.fail_on_generate:
            raise RuntimeError("secret cluster detail")
        if self.unavailable and len(self.calls) >= self.unavailable_after:
            raise NoWorkerAvailable(self.unavailable)
        # as the router does: a request that cannot be framed for a worker fails here
        codec.encode(
            m.Generate(
                request_id=request_id,
                prompt_token_ids=list(prompt_token_ids),
                params=params_to_dict(params),
                decode_worker_id="",
                decode_endpoint="",
            )
        )
        self.calls.append((request_id, list(prompt_token_ids), params))
        return self._stream(request_id, params)

    async def _stream(self, request_id: str, params: SamplingParams):
        s = self.script
        limit = params.max_tokens or len(s.tokens)
        tokens = s.tokens[:limit]
        try:
            for ev, start in enumerate(range(0, len(tokens), s.per_event)):
                if s.delay:
                    await asyncio.sleep(s.delay)
                if s.fail_at == ev:
                    raise RuntimeError("secret cluster detail")
                if request_id in self.aborted:
                    return
                chunk = tokens[start : start + s.per_event]
                last = start + s.per_event >= len(tokens)
                lps = None
                if params.logprobs is not None:
                    lps = [
                        logprob_entry(start + j, t, params.logprobs) for j, t in enumerate(chunk)
                    ]
                finish = stop = None
                if last:
                    finish = s.finish_reason if len(s.tokens) <= limit else "length"
                    stop = s.stop_reason if finish == "stop" else None
                yield TokenEvent(chunk, lps, finish, stop, s.cached)
        finally:
            self.closed.append(request_id)


class Server:
    """The app on 127.0.0.1, any free port, in a background thread."""

    def __init__(self, cluster: FakeCluster, api_key: str | None = None, **app_kw) -> None:
        self.cluster, self.api_key = cluster, api_key
        self.metrics = Metrics()
        access = app_kw.pop("access", AccessConfig(api_key=api_key))
        app = build_app(
            cluster, served_model_name=ALIAS, access=access, metrics=self.metrics, **app_kw
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kw) -> openai.OpenAI:
        key = kw.pop("api_key", self.api_key or "unused")
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=10, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def error_of(r: httpx.Response, status: int) -> dict:
    """The OpenAI error object of `r`, which must have `status` and nothing but that shape."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout} s waiting for {inspect.getsource(pred).strip()}"
            )
        time.sleep(0.01)


@pytest.fixture
def cluster(tokenizer) -> FakeCluster:
    return FakeCluster.scripted(tokenizer)


@pytest.fixture(scope="module")
def shared_server(tokenizer):
    s = Server(FakeCluster.scripted(tokenizer))
    yield s
    s.stop()


@pytest.fixture
def server(shared_server):
    """The module's server with its cluster as new (its metrics keep counting)."""
    shared_server.cluster.reset()
    return shared_server


@pytest.fixture(scope="session")
def lltok():
    """llguidance's tokenizer of the default model (its folder is made on first load)."""
    from baton.server.loader.gguf import cache_dir_for
    from baton.server.loader.resolve import locate

    folder = cache_dir_for(locate("smollm2", "auto").path)
    if not (folder / "tokenizer.json").is_file():
        from baton.server.router.model_files import router_model

        router_model("smollm2")
    import llguidance

    return llguidance.LLTokenizer(str(folder / "tokenizer.json"), eos_token=2)
