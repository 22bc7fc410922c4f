"""The load: arrivals (Poisson, or gamma with a burstiness), a concurrency cap, a warm-up."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from tqdm.asyncio import tqdm

from baton.bench.client import request_body, send
from baton.bench.datasets import BenchRequest
from baton.bench.metrics import RequestResult


@dataclass(frozen=True)
class LoadConfig:
    base_url: str
    endpoint: str = "/v1/completions"
    model: str = ""
    api_key: str | None = None
    request_rate: float = float("inf")  # requests per second; inf: all at once
    burstiness: float = 1.0  # gamma shape; 1 is Poisson, lower is burstier
    max_concurrency: int | None = None
    num_warmups: int = 1
    ignore_eos: bool = True
    seed: int = 0
    timeout_s: float = 600.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.request_rate <= 0:
            raise ValueError(f"request_rate must be positive, got {self.request_rate}")
        if self.burstiness <= 0:
            raise ValueError(f"burstiness must be positive, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds between sends: gamma(shape=burstiness, scale=1/(rate*burstiness)), mean 1/rate."""
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


async def _arrivals(reqs: list[BenchRequest], cfg: LoadConfig) -> AsyncIterator[BenchRequest]:
    gaps = arrival_gaps(len(reqs), cfg.request_rate, cfg.burstiness, cfg.seed)
    for req, gap in zip(reqs, gaps, strict=True):
        if gap > 0:
            await asyncio.sleep(gap)
        yield req


# send(client, url, req, body, headers, run_start) -> the request's result; client.send's shape


def headers_for(cfg: LoadConfig) -> dict:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def new_client(cfg: LoadConfig, transport: httpx.AsyncBaseTransport | None = None):
    """An AsyncClient with no connection cap and the run's timeout."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(cfg.timeout_s), limits=limits, transport=transport
    )


async def resolve_model(client: httpx.AsyncClient, cfg: LoadConfig, headers: dict) -> str:
    if cfg.model:
        return cfg.model
    r = await client.get(cfg.base_url.rstrip("/") + "/v1/models", headers=headers)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def run_load(reqs: list[BenchRequest], cfg: LoadConfig) -> tuple[list[RequestResult], float]:
    """(results in request order, seconds from the first send to the last answer)."""
    headers = headers_for(cfg)
    url = cfg.base_url.rstrip("/") + cfg.endpoint
    async with new_client(cfg) as client:
        model = await resolve_model(client, cfg, headers)
        body = {id(r): request_body(r, cfg.endpoint, model, cfg.ignore_eos) for r in reqs}
        for warm in reqs[: cfg.num_warmups]:  # untimed: first-request costs stay out
            w = await send(client, url, warm, body[id(warm)], headers, time.perf_counter())
            if not w.success:
                raise RuntimeError(f"the warm-up request failed: {w.error}")
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        bar = tqdm(total=len(reqs), disable=not cfg.progress, desc="requests")
        start = time.perf_counter()

        async def one(req: BenchRequest) -> RequestResult:
            if sem is None:
                res = await send(client, url, req, body[id(req)], headers, start)
            else:
                async with sem:
                    res = await send(client, url, req, body[id(req)], headers, start)
            bar.update(1)
            return res

        tasks = [asyncio.create_task(one(r)) async for r in _arrivals(reqs, cfg)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return list(results), duration
