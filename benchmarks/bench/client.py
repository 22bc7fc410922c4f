"""One streamed request to an OpenAI-compatible endpoint, timed on the client side."""

from __future__ import annotations

import json
import time

import httpx

from baton.bench.datasets import BenchRequest
from baton.bench.metrics import RequestResult


def request_body(req: BenchRequest, endpoint: str, model: str, ignore_eos: bool) -> dict:
    body: dict = {
        "model": model,
        "max_tokens": req.output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:  # a vLLM extra; servers that do not know it are sent nothing
        body["ignore_eos"] = True
    if endpoint.endswith("chat/completions"):
        prompt = req.prompt
        if not isinstance(prompt, list) or (prompt and not isinstance(prompt[0], dict)):
            raise ValueError("the chat endpoint needs chat messages; use a chat dataset")
        body["messages"] = prompt
    else:
        body["prompt"] = req.prompt
    return body


def _content(chunk: dict) -> str | None:
    choices = chunk.get("choices") or []
    if not choices:
        return None
    c = choices[0]
    return (c.get("delta") or {}).get("content") if "delta" in c else c.get("text")


async def send(
    client: httpx.AsyncClient,
    url: str,
    req: BenchRequest,
    body: dict,
    headers: dict,
    run_start: float,
    result: RequestResult | None = None,
) -> RequestResult:
    """Streams one request into `result` (a new RequestResult if None); never raises for what
    the server or the network does."""
    t0 = time.perf_counter()
    if result is None:
        result = RequestResult(False, req.prompt_len, 0, t0 - run_start)
    last = t0
    chunks, parts = 0, []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {r.status_code}: {text[:300]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return result
                now = time.perf_counter()
                if text := _content(chunk):
                    parts.append(text)
                    if chunks == 0:
                        result.ttft = now - t0
                    else:
                        result.itl.append(now - last)
                    chunks += 1
                    last = now
                usage = chunk.get("usage")
                if usage:
                    result.prompt_len = usage.get("prompt_tokens", req.prompt_len)
                    result.output_len = usage.get("completion_tokens", chunks)
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = details.get("cached_tokens") or 0
        result.latency = time.perf_counter() - t0
        result.text = "".join(parts)
        if chunks == 0:
            result.error = "the stream carried no content"
            return result
        if result.output_len == 0:  # a server without stream usage: count chunks
            result.output_len = chunks
        result.success = True
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        result.error = f"{type(e).__name__}: {str(e)[:300]}"
    return result
