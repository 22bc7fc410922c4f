"""The prefill side's DEALERs: one per decode worker, closed once idle so that decode workers
that left are not reconnected to forever."""

from __future__ import annotations

import time
from types import SimpleNamespace

import zmq

from baton.server.wire import messages as m
from baton.server.worker.kv_link import PEER_IDLE_S, KVSender


def test_idle_peers_are_closed_and_busy_ones_kept():
    ctx = zmq.Context()
    poller = zmq.Poller()
    busy = [SimpleNamespace(endpoint="tcp://127.0.0.1:2", waiting_on_peer=False)]
    handoffs = SimpleNamespace(all_outgoing=lambda: busy)
    engine = SimpleNamespace(handoffs=handoffs)

    def connect(endpoint: str) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        return s

    sender = KVSender(engine, connect, poller, lambda msg: None, lambda *a, **k: None, "p0", 5.0)
    try:
        for ep in ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"):  # nothing listens: sends queue
            sender._send(ep, m.KVAbort(request_id="r", reason="test"))
        gone = sender.peers["tcp://127.0.0.1:1"]
        sender.expire(time.monotonic() + PEER_IDLE_S / 2)
        assert len(sender.peers) == 2  # not idle long enough yet
        sender.expire(time.monotonic() + PEER_IDLE_S + 1)
        assert list(sender.peers) == ["tcp://127.0.0.1:2"]  # a handoff still goes there
        assert gone.closed and len(poller.sockets) == 1
        sender._send("tcp://127.0.0.1:1", m.KVAbort(request_id="r", reason="again"))
        assert not sender.peers["tcp://127.0.0.1:1"].closed  # opened again on its next use
    finally:
        sender.close()
        ctx.term()
