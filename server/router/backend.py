"""The router's side of ZeroMQ: registers workers, places requests, relays their tokens.

Implements the HTTP layer's Backend protocol. Runs on the server's asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from baton.scheduler.placement import Pool, WorkerState
from baton.scheduler.sampling_params import SamplingParams
from baton.server.api.backend import NoWorkerAvailable, TokenEvent
from baton.server.wire import codec
from baton.server.wire import messages as m

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    mode: str = "disagg"
    control: str = "tcp://127.0.0.1:0"  # where workers connect; port 0: any free port
    heartbeat_timeout_s: float = 10.0
    model: str | None = None  # expected model name (None: the first worker's)


@dataclass
class _Stream:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    workers: list[str] = field(default_factory=list)
    started: float = 0.0


class ZmqBackend:
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
        self.pool = Pool(config.mode, config.model)
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        host, _, port = config.control.rpartition(":")
        if port == "0":
            port = str(self.sock.bind_to_random_port(host))
        else:
            self.sock.bind(config.control)
        self.endpoint = f"{host}:{port}"
        self.streams: dict[str, _Stream] = {}
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._recv_loop()),
            asyncio.create_task(self._expire_loop()),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close(0)
        self.ctx.term()

    async def _send(self, worker_id: str, msg) -> bool:
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
                logger.warning("dropped a malformed frame from %r: %s", ident[:64], e)
                continue
            try:
                await self._dispatch(ident.decode("utf-8", "replace"), msg)
            except Exception:  # a bug handling one message must not stop the router
                logger.exception("error handling %s", type(msg).__name__)

    async def _dispatch(self, ident: str, msg) -> None:
        if isinstance(msg, m.Register):
            await self._on_register(ident, msg)
            return
        if isinstance(msg, m.Heartbeat) and ident == f"{msg.worker_id}/beat":
            ident = msg.worker_id  # a worker's heartbeat thread has its own socket
        w = self.pool.workers.get(ident)
        if w is None:
            logger.warning("dropped a %s from unregistered %r", type(msg).__name__, ident)
            return
        w.last_seen = time.monotonic()
        if isinstance(msg, m.Heartbeat):
            if w.state == "dead":
                w.state = "ready"
            w.running, w.waiting = msg.running, msg.waiting
            w.kv_usage, w.num_free_blocks = msg.kv_usage, msg.num_free_blocks
            if self.metrics is not None:
                self.metrics.observe_prefix_cache(ident, msg.prefix_queries, msg.prefix_hits)
        elif isinstance(msg, m.TokenOutput):
            if msg.queue_time_s is not None and self.metrics is not None:
                self.metrics.observe_queue_time(msg.queue_time_s)
            stream = self.streams.get(msg.request_id)
            if stream is not None:
                stream.queue.put_nowait(msg)
        elif isinstance(msg, m.KVReport):
            if self.metrics is not None and msg.ok:
                self.metrics.observe_kv_transfer(msg.nbytes, msg.seconds)
            elif self.metrics is not None:
                self.metrics.observe_kv_transfer_failure()
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
        )
        reason = None
        if ident != msg.worker_id:
            reason = "worker_id differs from the socket identity"
        elif (
            self.pool.workers.get(ident, None) is not None
            and self.pool.workers[ident].state == "ready"
        ):
            reason = f"worker id {ident!r} is already registered"
        elif msg.max_model_len < self.max_model_len:
            reason = f"max_model_len {msg.max_model_len} is below the router's {self.max_model_len}"
        else:
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
        await self._send(ident, m.RegisterReply(reason is None, reason or ""))

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.config.heartbeat_timeout_s / 4))
            for w in self.pool.expire(time.monotonic(), self.config.heartbeat_timeout_s):
                logger.error("worker %s missed its heartbeats; marking it dead", w.worker_id)
                for rid in list(w.assigned):
                    s = self.streams.get(rid)
                    if s is not None:
                        s.queue.put_nowait(
                            m.TokenOutput(
                                rid,
                                w.worker_id,
                                [],
                                None,
                                "abort",
                                None,
                                0,
                                f"worker {w.worker_id} stopped responding",
                            )
                        )

    # ---- Backend protocol -----------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        return self.pool.health()

    def workers(self) -> list[dict]:
        return [w.as_dict() for w in self.pool.workers.values()]

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        if request_id in self.streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        prefill = self.pool.pick_prefill()
        if prefill is None:
            raise NoWorkerAvailable("prefill" if self.pool.mode == "disagg" else "colocated")
        decode = None
        if self.pool.mode == "disagg":
            total = len(prompt_token_ids) + (params.max_tokens or 0)
            decode = self.pool.pick_decode(-(-total // self.block_size))
            if decode is None:
                raise NoWorkerAvailable("decode")
        stream = _Stream(started=time.monotonic())
        stream.workers = [prefill.worker_id] + ([decode.worker_id] if decode else [])
        self.streams[request_id] = stream
        for wid in stream.workers:
            self.pool.workers[wid].assigned.add(request_id)
            self.pool.workers[wid].served += 1
        gen = m.Generate(
            request_id,
            list(prompt_token_ids),
            m.params_to_dict(params),
            decode.worker_id if decode else "",
            decode.kv_endpoint if decode else "",
        )
        return self._relay(request_id, stream, gen, prefill.worker_id)

    async def _relay(self, request_id, stream, gen, prefill_id) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            if not await self._send(prefill_id, gen):
                raise RuntimeError(f"prefill worker {prefill_id} is unreachable")
            while True:
                msg: m.TokenOutput = await stream.queue.get()
                if msg.error:
                    finished = True
                    raise RuntimeError(msg.error)
                if msg.finish_reason is None and not msg.token_ids:
                    continue
                yield TokenEvent(
                    token_ids=list(msg.token_ids),
                    logprobs=msg.logprobs,
                    finish_reason=msg.finish_reason,
                    stop_reason=msg.stop_reason,
                    num_cached_tokens=msg.num_cached_tokens,
                )
                if msg.finish_reason is not None:
                    finished = True
                    return
        finally:
            self._forget(request_id)
            if not finished:
                await self._abort_workers(request_id, stream.workers)

    def _forget(self, request_id: str) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is None:
            return
        for wid in stream.workers:
            w = self.pool.workers.get(wid)
            if w is not None:
                w.assigned.discard(request_id)

    async def _abort_workers(self, request_id: str, worker_ids: list[str]) -> None:
        for wid in worker_ids:
            await self._send(wid, m.Abort(request_id))

    async def abort(self, request_id: str) -> None:
        stream = self.streams.get(request_id)
        if stream is None:
            return
        workers = list(stream.workers)
        self._forget(request_id)
        await self._abort_workers(request_id, workers)
