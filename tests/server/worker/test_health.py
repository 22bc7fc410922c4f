"""A worker's HTTP probes: ready only while registered and taking work, alive while it steps."""

from __future__ import annotations

import time

import httpx
import pytest

from baton.server.worker.health import HealthServer


class FakeWorker:
    def __init__(self) -> None:
        self.id = "w0"
        self.registered = False
        self.alive = True
        self.draining = False
        self.last_tick = time.monotonic()


@pytest.fixture
def probed():
    w = FakeWorker()
    server = HealthServer(w, "127.0.0.1", 0, "decode", stuck_after_s=5.0)
    server.start()
    try:
        yield w, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def test_ready_only_while_registered_and_taking_work(probed):
    w, url = probed
    r = httpx.get(url + "/health")
    assert r.status_code == 503 and r.json()["status"] == "not registered"
    w.registered = True
    r = httpx.get(url + "/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "worker": "w0", "role": "decode"}
    w.draining = True
    assert httpx.get(url + "/health").json()["status"] == "draining"
    assert httpx.get(url + "/health").status_code == 503
    w.draining, w.alive = False, False
    assert httpx.get(url + "/health").status_code == 503


def test_alive_until_the_loop_is_stuck(probed):
    w, url = probed
    r = httpx.get(url + "/live")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    w.last_tick -= 10  # no turn of the loop for longer than stuck_after_s
    r = httpx.get(url + "/live")
    assert r.status_code == 503 and r.json()["status"] == "stuck"


def test_unknown_paths_are_404(probed):
    _, url = probed
    r = httpx.get(url + "/metrics")
    assert r.status_code == 404 and "/health" in r.json()["error"]
