"""The router's control socket: workers register, beat and report on it; it tells which died.

Runs on the server's asyncio loop. Every worker state change goes through the `Pool`; what
concerns a request (its tokens, a finished handoff, a lost worker) goes to the `RequestRelay`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from baton.scheduler.placement import Pool, WorkerState
from baton.server.router.config import RouterConfig
from baton.server.router.relay import RequestRelay
from baton.server.wire import codec, curve
from baton.server.wire import messages as m

logger = logging.getLogger(__name__)


class WorkerControl:
    """Owns the ROUTER socket workers connect to: registration, heartbeats, liveness."""

    def __init__(
        self,
        config: RouterConfig,
        pool: Pool,
        relay: RequestRelay,
        max_model_len: int,
        metrics=None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.relay = relay
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.ctx = zmq.asyncio.Context()
        self.auth = curve.start_authenticator(self.ctx, config.curve)
        self.sock = self.ctx.socket(zmq.ROUTER)
        curve.secure_server(self.sock, config.curve)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        host, _, port = config.control.rpartition(":")
        if port == "0":
            port = str(self.sock.bind_to_random_port(host))
        else:
            self.sock.bind(config.control)
        self.endpoint = f"{host}:{port}"
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._peer_fds: dict[int, str] = {}  # socket fd -> the worker whose frames came on it
        self._outdated: set[bytes] = set()  # identities told their protocol version is not ours
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._recv_loop()),
            asyncio.create_task(self._expire_loop()),
            asyncio.create_task(self._monitor_loop()),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()

    async def send(self, worker_id: str, msg) -> bool:
        try:
            await self.sock.send_multipart([worker_id.encode(), *codec.encode(msg)])
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH: the peer is gone
            logger.warning("could not send %s to %s: %s", type(msg).__name__, worker_id, e)
            return False

    async def _recv_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            ident = bytes(frames[0].buffer)
            try:
                msg, _ = codec.decode(frames[1:])
            except codec.WireError as e:
                await self._on_undecodable(ident, frames[1:], e)
                continue
            try:
                await self._dispatch(ident.decode("utf-8", "replace"), msg, frames[1])
            except Exception:  # a bug handling one message must not stop the router
                logger.exception("error handling %s", type(msg).__name__)

    async def _on_undecodable(self, ident: bytes, frames, error: codec.WireError) -> None:
        """A Register of another protocol version is answered, in that version where this
        router can write it, with a refusal naming both versions: the worker stops at once
        instead of waiting for an answer it cannot read. Every other bad frame is dropped."""
        try:
            name, version = codec.peek(frames)
        except codec.WireError:
            name = version = None
        if name != m.Register.TYPE or version == codec.PROTOCOL_VERSION:
            logger.warning("dropped a malformed frame from %r: %s", ident[:64], error)
            return
        ours = codec.PROTOCOL_VERSION
        who = "worker" if version < ours else "router"
        reason = f"protocol version {version} is not this router's {ours}: upgrade the {who}"
        reply = m.RegisterReply(accepted=False, reason=reason)
        try:
            frames = codec.encode_as(reply, version)
        except ValueError:  # a version this router cannot write: its own, for newer workers
            frames = codec.encode(reply)
        if ident not in self._outdated:
            if len(self._outdated) >= 4096:  # bounded: identities are the peers' to choose
                self._outdated.clear()
            self._outdated.add(ident)
            logger.warning("refused worker %r: %s", ident[:64].decode("utf-8", "replace"), reason)
        try:
            await self.sock.send_multipart([ident, *frames])
        except zmq.ZMQError as e:
            logger.warning("could not refuse worker %r: %s", ident[:64], e)

    async def _dispatch(self, ident: str, msg, frame: zmq.Frame | None = None) -> None:
        if isinstance(msg, m.Register):
            await self._on_register(ident, msg)
            return
        if isinstance(msg, m.Heartbeat) and ident == f"{msg.worker_id}/beat":
            ident = msg.worker_id  # a worker's heartbeat thread has its own socket
        w = self.pool.workers.get(ident)
        if w is None:
            if isinstance(msg, m.Heartbeat):  # this router restarted, or dropped the worker
                await self.send(ident, m.Reconnect(reason="this router does not know you"))
            else:
                logger.warning("dropped a %s from unregistered %r", type(msg).__name__, ident)
            return
        if frame is not None:  # which connection is this worker's (see _monitor_loop)
            self._peer_fds[frame.get(zmq.SRCFD)] = ident
        self.pool.seen(ident, time.monotonic())
        if isinstance(msg, m.Heartbeat):
            if w.state == "dead":  # back after being given up: its old work went elsewhere
                await self.send(ident, m.Reconnect(reason="declared dead earlier; register again"))
                return
            self.pool.beat(
                ident,
                draining=msg.draining,
                running=msg.running,
                waiting=msg.waiting,
                kv_usage=msg.kv_usage,
                num_free_blocks=msg.num_free_blocks,
                rss_bytes=msg.rss_bytes,
                kv_resident_bytes=msg.kv_resident_bytes,
            )
            if self.metrics is not None:
                self.metrics.observe_prefix_cache(ident, msg.prefix_queries, msg.prefix_hits)
        elif isinstance(msg, m.TokenOutput | m.RequestFailed):
            first = isinstance(msg, m.TokenOutput) and msg.queue_time_s is not None
            if first and self.metrics is not None:
                self.metrics.observe_queue_time(msg.queue_time_s)
            self.relay.deliver(msg)
        elif isinstance(msg, m.KVEvents):
            ok = self.pool.index.apply(ident, msg.seq, msg.reset, msg.stored, msg.removed)
            if not ok:
                logger.warning("lost track of worker %s's KV events; asking for a snapshot", ident)
                await self.send(ident, m.KVResync(reason=f"batch {msg.seq} out of order"))
        elif isinstance(msg, m.KVReport):
            if self.metrics is not None and msg.ok:
                self.metrics.observe_kv_transfer(msg.nbytes, msg.seconds, msg.skipped_nbytes)
            elif self.metrics is not None:
                self.metrics.observe_kv_transfer_failure()
            if msg.ok:
                self.relay.handed_off(msg.request_id, ident)
        elif isinstance(msg, m.Deregister):
            logger.info("worker %s left: %s", ident, msg.reason)
            self._worker_lost(ident, f"worker {ident} left ({msg.reason})")
            self.pool.remove(ident)
            if self.metrics is not None:
                self.metrics.forget_worker(ident)
        else:
            logger.warning("dropped an unexpected %s from %s", type(msg).__name__, ident)

    async def _on_register(self, ident: str, msg: m.Register) -> None:
        lay = msg.layout
        w = WorkerState(
            worker_id=ident,
            role=msg.role,
            pid=msg.pid,
            host=msg.host,
            model=msg.model,
            layout=(lay.num_layers, lay.block_size, lay.num_kv_heads, lay.head_dim, lay.dtype),
            kv_endpoint=msg.kv_endpoint,
            max_model_len=msg.max_model_len,
            num_blocks=msg.num_blocks,
            last_seen=time.monotonic(),
            num_free_blocks=msg.num_blocks,
            cpu=None if msg.cpu is None else dataclasses.asdict(msg.cpu),
        )
        known = self.pool.workers.get(ident)
        reason = None
        if ident != msg.worker_id:
            reason = "worker_id differs from the socket identity"
        elif known is not None and known.state != "dead" and known.pid == msg.pid:
            # The same process again: it restarted its session (a Reconnect); whatever it ran
            # for us before is gone on its side.
            self._worker_lost(ident, f"worker {ident} registered again")
        elif known is not None and known.state != "dead":
            reason = f"worker id {ident!r} is already registered"
        if reason is None and msg.max_model_len < self.max_model_len:
            reason = f"max_model_len {msg.max_model_len} is below the router's {self.max_model_len}"
        if reason is None:
            reason = self.pool.admit(w)
        if reason is not None:
            logger.error("refused worker %s (%s, pid %d): %s", ident, msg.role, msg.pid, reason)
        else:
            logger.info(
                "worker %s joined as %s (pid %d, %d KV blocks)",
                ident,
                msg.role,
                msg.pid,
                msg.num_blocks,
            )
        await self.send(ident, m.RegisterReply(accepted=reason is None, reason=reason or ""))

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.config.heartbeat_timeout_s / 4))
            self.expire_silent(time.monotonic())

    def expire_silent(self, now: float) -> None:
        """Workers that missed their heartbeats are lost like any other (and counted so)."""
        for w in self.pool.silent(now, self.config.heartbeat_timeout_s):
            logger.error("worker %s missed its heartbeats; marking it dead", w.worker_id)
            self._worker_lost(w.worker_id, f"worker {w.worker_id} stopped responding")

    async def _monitor_loop(self) -> None:
        """A worker's connection dropped (its process died): no need to wait for heartbeats."""
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())
            wid = self._peer_fds.pop(int(event["value"]), None)
            w = self.pool.workers.get(wid) if wid is not None else None
            if w is not None and w.state != "dead":
                logger.error("worker %s disconnected; marking it dead", wid)
                self._worker_lost(wid, f"worker {wid} disconnected")

    def _worker_lost(self, worker_id: str, reason: str) -> None:
        """Every request that depends on the worker resumes elsewhere (see `RequestRelay`)."""
        w = self.pool.workers.get(worker_id)
        if w is None:
            return
        if w.state != "dead" and self.metrics is not None:
            self.metrics.observe_worker_lost()
        for fd in [fd for fd, wid in self._peer_fds.items() if wid == worker_id]:
            del self._peer_fds[fd]
        for wire_id in self.pool.lose(worker_id):
            self.relay.lost(wire_id, worker_id, reason)
        for gone in self.pool.prune_dead():
            if self.metrics is not None:
                self.metrics.forget_worker(gone)
