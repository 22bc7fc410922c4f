"""Frozen configuration of one worker process."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from baton.server.config import EngineConfig
from baton.server.cpu_threads import ThreadPlan
from baton.server.wire.curve import CurveKeys
from baton.server.wire.messages import ROLES


@dataclass(frozen=True)
class WorkerConfig:
    role: str
    router: str  # the router's control endpoint, e.g. tcp://127.0.0.1:8001
    engine: EngineConfig
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    kv_host: str = "127.0.0.1"  # where the decode side binds its KV socket (reachable by peers)
    kv_port: int = 0  # 0: any free port
    heartbeat_s: float = 1.0
    register_timeout_s: float = 60.0
    drain_timeout_s: float = 30.0  # SIGTERM: finish work this long, then give the rest back
    kv_timeout_s: float = 60.0  # a handoff with no progress this long is given up
    # When set, the worker stops once this process is no longer its parent: the `baton serve`
    # that started it went away, even by SIGKILL, and must not leave a worker behind.
    parent_pid: int = 0
    health_host: str = "127.0.0.1"  # where the HTTP probes listen (see worker/health.py)
    health_port: int | None = None  # None: no probes; 0: any free port
    curve: CurveKeys | None = None  # set: every link (router, KV peers) is CURVE-secured
    threads: ThreadPlan | None = None  # how this process runs on its CPU (see cpu_threads)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.engine.detokenize:
            raise ValueError("engine.detokenize: a worker leaves text to the router")
