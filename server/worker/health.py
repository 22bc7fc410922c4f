"""A worker's HTTP probes, for orchestrators (Kubernetes, docker): off unless given a port.

- `GET /health`: 200 while the worker is registered with a router and takes work (readiness);
  503 while it loads, registers, drains or has lost its router.
- `GET /live`: 200 while the worker's loop keeps turning (liveness); 503 once it has been stuck
  for `stuck_after_s`.

Both answer a small JSON body. The server runs in its own thread and only reads the worker's
state, so a long engine step never delays an answer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

logger = logging.getLogger(__name__)


class Probed(Protocol):
    """What the probes read of a worker."""

    id: str
    registered: bool
    alive: bool
    last_tick: float  # time.monotonic() of the loop's last turn

    @property
    def draining(self) -> bool: ...


class HealthServer:
    def __init__(
        self, worker: Probed, host: str, port: int, role: str, stuck_after_s: float = 120.0
    ) -> None:
        self.worker, self.role, self.stuck_after_s = worker, role, stuck_after_s
        probes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/health":
                    status, body = probes.readiness()
                elif path == "/live":
                    status, body = probes.liveness()
                else:
                    status, body = 404, {"error": f"no route {path}; try /health or /live"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args) -> None:  # probes every few seconds
                logger.debug("health %s", format % args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)

    def readiness(self) -> tuple[int, dict]:
        w = self.worker
        if w.draining:
            state = "draining"
        elif not w.alive:
            state = "stopped"
        elif not w.registered:
            state = "not registered"
        else:
            state = "ready"
        body = {"status": state, "worker": w.id, "role": self.role}
        return (200 if state == "ready" else 503), body

    def liveness(self) -> tuple[int, dict]:
        stuck = time.monotonic() - self.worker.last_tick
        ok = stuck < self.stuck_after_s
        body = {"status": "ok" if ok else "stuck", "seconds_since_last_step": round(stuck, 3)}
        return (200 if ok else 503), body

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
