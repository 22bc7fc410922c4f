"""Run the router: the HTTP app and the ZeroMQ cluster on one asyncio loop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import uvicorn

from baton.server.api.app import build_app
from baton.server.api.auth import AccessConfig
from baton.server.api.metrics import Metrics
from baton.server.config import resolve_max_model_len
from baton.server.router.cluster import RouterConfig, ZmqCluster

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model: str = "smollm2"
    load_format: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    access: AccessConfig = AccessConfig()
    max_model_len: int | None = None
    block_size: int = 16
    router: RouterConfig = RouterConfig()


def build_cluster(config: ServeConfig) -> ZmqCluster:
    from baton.server.router.model_files import router_model

    spec = router_model(config.model, config.load_format)
    # NOTE: the engine's own rule, so workers started with the same flags always cover it.
    max_len = resolve_max_model_len(config.max_model_len, spec.max_position_embeddings)
    metrics = Metrics()
    return ZmqCluster(
        config.router,
        spec.tokenizer,
        max_len,
        spec.name,
        block_size=config.block_size,
        metrics=metrics,
    )


async def run_router(config: ServeConfig, cluster: ZmqCluster, ready=None) -> None:
    """Serve until cancelled. `ready`, if given, is called once the socket listens."""
    cluster.start()
    app = build_app(
        cluster, served_model_name=config.model, access=config.access, metrics=cluster.metrics
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                await task  # raises why it could not start
                return
            await asyncio.sleep(0.05)
        if ready is not None:
            ready(server)
        await task
    finally:
        server.should_exit = True
        await cluster.stop()
