"""The router's settings."""

from __future__ import annotations

from dataclasses import dataclass

from baton.scheduler.routing import RoutingConfig
from baton.server.wire import curve


@dataclass(frozen=True)
class RouterConfig:
    mode: str = "disagg"
    control: str = "tcp://127.0.0.1:0"  # where workers connect; port 0: any free port
    heartbeat_timeout_s: float = 10.0
    routing: RoutingConfig = RoutingConfig()
    model: str | None = None  # expected model name (None: the first worker's)
    max_num_requests: int = 4096  # in flight at once; past it, 429 at once
    request_timeout_s: float | None = None  # a request's deadline (None: none)
    max_attempts: int = 4  # per request: its first placement and up to 3 failovers
    curve: curve.CurveKeys | None = None  # set: workers must hold the deployment keys
