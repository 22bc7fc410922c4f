"""Bodies over the limit are a 413 whether declared, chunked or lied about, and the app never
holds more than the limit; at the limit the request is served."""

from __future__ import annotations

import asyncio
import json
import socket

from baton.server.api.app import build_app
from baton.server.api.body_limit import DEFAULT_MAX_BODY_BYTES
from tests.server.api.conftest import ALIAS, error_of

LIMIT = 1024
JSON = {"content-type": "application/json"}


def asgi_post(app, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, dict]:
    """POST /v1/completions straight into `app`, the body in `chunks`; (status, JSON body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *headers],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1234),
    }
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)  # a client that stays connected
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


def body_of(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes."""
    head = json.dumps({"model": ALIAS, "prompt": "x", "max_tokens": 2}).encode()
    return head[:-1] + b" " * (size - len(head)) + b"}"


def test_a_declared_length_over_the_limit_is_413_before_reading(cluster):
    app = build_app(cluster, served_model_name=ALIAS, max_body_bytes=LIMIT)
    status, body = asgi_post(app, [], [(b"content-length", str(LIMIT + 1).encode())])
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert str(LIMIT) in body["error"]["message"] and cluster.calls == []


def test_a_chunked_body_over_the_limit_is_413(cluster):
    app = build_app(cluster, served_model_name=ALIAS, max_body_bytes=LIMIT)
    status, body = asgi_post(app, [b"x" * 100] * 11, [])
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    assert cluster.calls == []


def test_a_content_length_that_lies_is_not_believed(cluster):
    app = build_app(cluster, served_model_name=ALIAS, max_body_bytes=LIMIT)
    chunks = [body_of(LIMIT - 1)[:-1], b" " * 100 + b"}"]
    status, _ = asgi_post(app, chunks, [(b"content-length", b"10")])
    assert status == 413 and cluster.calls == []


def test_a_body_at_the_limit_is_served(cluster):
    app = build_app(cluster, served_model_name=ALIAS, max_body_bytes=LIMIT)
    content = body_of(LIMIT)
    chunks = [content[i : i + 100] for i in range(0, LIMIT, 100)]
    status, body = asgi_post(app, chunks, [(b"content-length", str(LIMIT).encode())])
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_a_giant_body_over_http_is_413_and_the_server_carries_on(server):
    r = server.post("/v1/completions", content=body_of(DEFAULT_MAX_BODY_BYTES + 1), headers=JSON)
    assert error_of(r, 413)["code"] == "request_too_large"
    r = server.post("/v1/completions", content=body_of(DEFAULT_MAX_BODY_BYTES), headers=JSON)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_a_giant_chunked_body_over_http_is_413(server):
    content = body_of(DEFAULT_MAX_BODY_BYTES + 1)
    chunks = (content[i : i + 2**16] for i in range(0, len(content), 2**16))
    error_of(server.post("/v1/completions", content=chunks, headers=JSON), 413)
    assert server.get("/health").status_code == 200


def test_a_declared_giant_body_is_refused_before_it_is_sent(server):
    """Only the headers go out: the answer comes without waiting for a byte of the body."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 10000000000\r\n\r\n"
        )
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 413 "), head
