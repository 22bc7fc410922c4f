"""The router's side of ZeroMQ: registers workers, places requests, relays their tokens.

Implements the HTTP layer's Cluster protocol. Runs on the server's asyncio loop. Two parts
share one `Pool`: `WorkerControl` (the control socket: registration, heartbeats, liveness) and
`RequestRelay` (placement, failover and the token streams).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from baton.scheduler.placement import Pool
from baton.scheduler.sampling_params import SamplingParams
from baton.server.api.cluster import TokenEvent
from baton.server.router.config import RouterConfig
from baton.server.router.control import WorkerControl
from baton.server.router.relay import RequestRelay
from baton.server.router.stream import Stream

__all__ = ["RouterConfig", "ZmqCluster"]


class ZmqCluster:
    def __init__(
        self,
        config: RouterConfig,
        tokenizer,
        max_model_len: int,
        model_name: str,
        block_size: int = 16,
        metrics=None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.block_size = block_size
        self.metrics = metrics
        self.pool = Pool(config.mode, config.model, config.routing)
        self.relay = RequestRelay(config, self.pool, block_size, self._send, metrics)
        self.control = WorkerControl(config, self.pool, self.relay, max_model_len, metrics)
        self.endpoint = self.control.endpoint

    async def _send(self, worker_id: str, msg) -> bool:
        return await self.control.send(worker_id, msg)

    @property
    def streams(self) -> dict[str, Stream]:
        return self.relay.streams

    def start(self) -> None:
        self.control.start()

    async def stop(self) -> None:
        await self.control.stop()

    # ---- Cluster protocol -----------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        return self.pool.health()

    def workers(self) -> list[dict]:
        """Each worker as `/workers` shows it, with the prefix blocks the router's index holds
        for it (from its KV events)."""
        return [
            {**w.as_dict(), "cached_blocks": self.pool.index.size(w.worker_id)}
            for w in self.pool.workers.values()
        ]

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        return await self.relay.generate(request_id, prompt_token_ids, params)

    async def abort(self, request_id: str) -> None:
        await self.relay.abort(request_id)
