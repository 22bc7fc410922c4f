"""The router's ZeroMQ cluster against workers the test plays on raw sockets: a worker of another
protocol version is told why it is refused, at once and in words it can read; a RequestFailed is
resumed elsewhere or reaches the client, as the worker asked."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import msgpack
import pytest
import zmq
import zmq.asyncio

from baton import SamplingParams
from baton.server.api.cluster import RequestFailed
from baton.server.router.cluster import RouterConfig, ZmqCluster
from baton.server.wire import codec
from baton.server.wire import messages as m

LOGGER = "baton.server.router.control"
LAYOUT = m.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=16, dtype="float32")
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
# A Register as a version-4 worker sent it (before Register.version was dropped).
V4_REGISTER = {
    "worker_id": "old-0",
    "role": "both",
    "pid": 1,
    "host": "127.0.0.1",
    "model": "tiny",
    "layout": dataclasses.asdict(LAYOUT),
    "kv_endpoint": "",
    "max_model_len": 512,
    "num_blocks": 64,
    "version": "0.1.0",
    "cpu": None,
}


class Peer:
    """A worker played by the test: a DEALER with the worker's identity on the router."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, worker_id: str) -> None:
        self.id = worker_id
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    async def send(self, msg) -> None:
        await self.sock.send_multipart(codec.encode(msg))

    async def send_header(self, header: dict) -> None:
        await self.sock.send_multipart([msgpack.packb(header)])

    async def recv(self, timeout: float = 1.0) -> list[bytes]:
        return await asyncio.wait_for(self.sock.recv_multipart(), timeout)

    async def recv_msg(self, timeout: float = 5.0):
        return codec.decode(await self.recv(timeout))[0]

    async def silent(self, seconds: float = 0.3) -> bool:
        return not await self.sock.poll(int(seconds * 1000))

    async def register(self) -> None:
        await self.send(
            m.Register(
                worker_id=self.id,
                role="both",
                pid=len(self.id),
                host="127.0.0.1",
                model="tiny",
                layout=LAYOUT,
                kv_endpoint="",
                max_model_len=512,
                num_blocks=64,
            )
        )
        reply = await self.recv_msg()
        assert reply == m.RegisterReply(accepted=True, reason="")


def run_router(test, **config):
    """Run `test(cluster, ctx)` against a started colocated router; everything closed after."""

    async def main():
        cluster = ZmqCluster(RouterConfig(mode="colocated", **config), None, 512, "tiny")
        cluster.start()
        ctx = zmq.asyncio.Context()
        try:
            await test(cluster, ctx)
        finally:
            ctx.destroy(0)
            await cluster.stop()

    asyncio.run(main())


def refusals(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and "refused" in r.getMessage()
    ]


def test_a_worker_of_the_previous_version_is_refused_in_its_own_version(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def test(cluster, ctx):
        old = Peer(ctx, cluster.endpoint, "old-0")
        for _ in range(2):  # a worker that retries is answered each time, logged once
            await old.send_header({"t": "register", "v": 4, "f": V4_REGISTER})
            frames = await old.recv(timeout=1.0)
            assert len(frames) == 1
            header = msgpack.unpackb(frames[0])
            assert header["t"] == "register_reply" and header["v"] == 4
            assert header["f"].keys() == {"accepted", "reason"}  # version 4's RegisterReply
            assert header["f"]["accepted"] is False
            reason = header["f"]["reason"]
            assert "version 4" in reason and f"router's {codec.PROTOCOL_VERSION}" in reason
            assert "upgrade the worker" in reason
        assert "old-0" not in cluster.pool.workers
        (logged,) = refusals(caplog)
        assert "old-0" in logged and reason in logged
        # Any other frame of another version is dropped (and logged), never answered.
        beat = {"worker_id": "old-0", "running": 0, "waiting": 0, "kv_usage": 0.0}
        await old.send_header({"t": "heartbeat", "v": 4, "f": beat})
        assert await old.silent()
        dropped = [
            r.getMessage() for r in caplog.records if "dropped a malformed" in r.getMessage()
        ]
        assert len(dropped) == 1 and "protocol version 4" in dropped[0]

    run_router(test)


def test_a_newer_worker_is_refused_in_this_routers_version(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)

    async def test(cluster, ctx):
        new = Peer(ctx, cluster.endpoint, "new-0")
        newer = codec.PROTOCOL_VERSION + 1
        await new.send_header({"t": "register", "v": newer, "f": {"whatever": "it holds now"}})
        frames = await new.recv(timeout=1.0)
        assert codec.peek(frames) == ("register_reply", codec.PROTOCOL_VERSION)
        reply = codec.decode(frames)[0]
        assert not reply.accepted and f"version {newer}" in reply.reason
        assert "upgrade the router" in reply.reason
        assert len(refusals(caplog)) == 1
        # Garbage, and a frame of this version that is malformed, are only dropped.
        await new.sock.send_multipart([b"\xc1 not msgpack"])
        await new.send_header({"t": "register", "v": codec.PROTOCOL_VERSION, "f": {}})
        assert await new.silent()
        assert "new-0" not in cluster.pool.workers

    run_router(test)


def token(request_id: str, worker_id: str, tid: int, finish: str | None = None):
    return m.TokenOutput(
        request_id=request_id,
        worker_id=worker_id,
        token_ids=[tid],
        logprobs=None,
        finish_reason=finish,
        stop_reason=None,
        num_cached_tokens=0,
    )


def test_a_failure_the_worker_may_retry_is_resumed_on_another_worker():
    async def test(cluster, ctx):
        peers = {wid: Peer(ctx, cluster.endpoint, wid) for wid in ("a", "b")}
        for p in peers.values():
            await p.register()
        it = await cluster.generate("r", [5, 6, 7], GREEDY)
        attempt = cluster.streams["r"].attempt
        first = attempt.prefill
        assert attempt.involved == [first]
        ran, other = peers[first], peers[next(w for w in peers if w != first)]
        gen = await ran.recv_msg()
        assert isinstance(gen, m.Generate) and gen.request_id == "r"
        await ran.send(token("r", ran.id, 9))
        assert (await it.__anext__()).token_ids == [9]
        nxt = asyncio.ensure_future(it.__anext__())  # the client waits on while it resumes
        error = f"worker {ran.id} is draining"
        await ran.send(m.RequestFailed(request_id="r", worker_id=ran.id, error=error, retry=True))
        resumed = await other.recv_msg()
        assert isinstance(resumed, m.Generate) and resumed.request_id == "r@2"
        assert resumed.prior_output_ids == [9]  # recomputed with what the client already has
        assert await ran.recv_msg() == m.Abort(request_id="r")  # the abandoned attempt
        await other.send(token("r@2", other.id, 10, finish="length"))
        ev = await asyncio.wait_for(nxt, 5)
        assert ev.token_ids == [10] and ev.finish_reason == "length"
        with pytest.raises(StopAsyncIteration):
            await it.__anext__()

    run_router(test)


def test_a_failure_of_the_request_itself_reaches_the_client():
    async def test(cluster, ctx):
        peer = Peer(ctx, cluster.endpoint, "a")
        await peer.register()
        it = await cluster.generate("r", [5, 6, 7], GREEDY)
        assert isinstance(await peer.recv_msg(), m.Generate)
        await peer.send(
            m.RequestFailed(request_id="r", worker_id="a", error="bad params", retry=False)
        )
        with pytest.raises(RequestFailed) as e:
            await it.__anext__()
        assert e.value.status == 500 and str(e.value) == "worker a: bad params"
        assert "r" not in cluster.streams and not cluster.pool.workers["a"].assigned

    run_router(test)
