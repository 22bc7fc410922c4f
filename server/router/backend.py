"""The router's side of ZeroMQ: registers workers, places requests, relays their tokens.

Implements the HTTP layer's Backend protocol. Runs on the server's asyncio loop.

Failover: the router keeps every token it streamed. When a worker a request depends on dies
(its socket drops or its heartbeats stop), deregisters, or gives the request back (draining, a
failed KV handoff), the request is resumed elsewhere: the prompt plus the tokens already streamed
are recomputed on a decode-capable worker, so the client's stream goes on unbroken and greedy
output is what it would have been.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from baton.scheduler.placement import Pool, WorkerState
from baton.scheduler.sampling_params import SamplingParams
from baton.server.api.backend import NoWorkerAvailable, Overloaded, RequestFailed, TokenEvent
from baton.server.router.stream import Stream, WorkerLost
from baton.server.wire import codec, curve
from baton.server.wire import messages as m

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    mode: str = "disagg"
    control: str = "tcp://127.0.0.1:0"  # where workers connect; port 0: any free port
    heartbeat_timeout_s: float = 10.0
    model: str | None = None  # expected model name (None: the first worker's)
    max_num_requests: int = 4096  # in flight at once; past it, 429 at once
    request_timeout_s: float | None = None  # a request's deadline (None: none)
    max_attempts: int = 4  # per request: its first placement and up to 3 failovers
    curve: curve.CurveKeys | None = None  # set: workers must hold the deployment keys


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
        self.streams: dict[str, Stream] = {}  # by request id
        self.attempts: dict[str, Stream] = {}  # by the id of their current attempt on the wire
        self._peer_fds: dict[int, str] = {}  # socket fd -> the worker whose frames came on it
        self._outdated: set[bytes] = set()  # identities told their protocol version is not ours
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle ------------------------------------------------------------------------

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
                await self._send(ident, m.Reconnect(reason="this router does not know you"))
            else:
                logger.warning("dropped a %s from unregistered %r", type(msg).__name__, ident)
            return
        if frame is not None:  # which connection is this worker's (see _monitor_loop)
            self._peer_fds[frame.get(zmq.SRCFD)] = ident
        w.last_seen = time.monotonic()
        if isinstance(msg, m.Heartbeat):
            if w.state == "dead":  # back after being given up: its old work went elsewhere
                await self._send(ident, m.Reconnect(reason="declared dead earlier; register again"))
                return
            w.state = "draining" if msg.draining else "ready"
            w.running, w.waiting = msg.running, msg.waiting
            w.kv_usage, w.num_free_blocks = msg.kv_usage, msg.num_free_blocks
            if self.metrics is not None:
                self.metrics.observe_prefix_cache(ident, msg.prefix_queries, msg.prefix_hits)
        elif isinstance(msg, m.TokenOutput | m.RequestFailed):
            first = isinstance(msg, m.TokenOutput) and msg.queue_time_s is not None
            if first and self.metrics is not None:
                self.metrics.observe_queue_time(msg.queue_time_s)
            stream = self.attempts.get(msg.request_id)
            if stream is not None:
                stream.queue.put_nowait(msg)
        elif isinstance(msg, m.KVReport):
            if self.metrics is not None and msg.ok:
                self.metrics.observe_kv_transfer(msg.nbytes, msg.seconds)
            elif self.metrics is not None:
                self.metrics.observe_kv_transfer_failure()
            stream = self.attempts.get(msg.request_id)
            if msg.ok and stream is not None and ident in stream.workers[:-1]:
                # The KV arrived: the request no longer depends on its prefill worker.
                stream.workers.remove(ident)
                w.assigned.discard(msg.request_id)
        elif isinstance(msg, m.Deregister):
            logger.info("worker %s left: %s", ident, msg.reason)
            self._worker_lost(ident, f"worker {ident} left ({msg.reason})")
            del self.pool.workers[ident]
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
        await self._send(ident, m.RegisterReply(accepted=reason is None, reason=reason or ""))

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.config.heartbeat_timeout_s / 4))
            for w in self.pool.expire(time.monotonic(), self.config.heartbeat_timeout_s):
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
        """Every request that depends on the worker resumes elsewhere (see `_relay`)."""
        w = self.pool.workers.get(worker_id)
        if w is None:
            return
        if w.state != "dead" and self.metrics is not None:
            self.metrics.observe_worker_lost()
        w.state = "dead"
        for fd in [fd for fd, wid in self._peer_fds.items() if wid == worker_id]:
            del self._peer_fds[fd]
        for wire_id in list(w.assigned):
            stream = self.attempts.get(wire_id)
            if stream is not None:
                stream.queue.put_nowait(WorkerLost(wire_id, worker_id, reason))
        w.assigned.clear()

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
        if len(self.streams) >= self.config.max_num_requests:
            raise Overloaded(f"{len(self.streams)} requests in flight, the router's limit")
        now = time.monotonic()
        timeout = self.config.request_timeout_s
        stream = Stream(
            request_id, list(prompt_token_ids), params, now, now + timeout if timeout else None
        )
        blocks = stream.blocks_needed(self.block_size)
        why = self.pool.never_fits(blocks)
        if why is not None:
            raise ValueError(why)
        plan = self.pool.plan(blocks, resumed=False)
        if plan is None:
            raise NoWorkerAvailable(self._missing_role())
        self.streams[request_id] = stream
        try:
            if not await self._launch(stream, *plan):
                await self._replan(stream, "the worker chosen is unreachable", plan[0].worker_id)
        except BaseException:
            self.streams.pop(request_id, None)
            await self._end_attempt(stream, abort=True)
            raise
        return self._relay(stream)

    def _missing_role(self) -> str:
        if self.pool.mode == "colocated":
            return "colocated"
        return "prefill" if not self.pool.ready("prefill") else "decode"

    async def _launch(self, stream: Stream, first: WorkerState, decode: WorkerState | None) -> bool:
        """Send the request's next attempt; False if `first` could not be reached."""
        wire_id = stream.next_wire_id()
        stream.wire_id = wire_id
        self.attempts[wire_id] = stream
        stream.workers = [first.worker_id] + ([decode.worker_id] if decode else [])
        for wid in stream.workers:
            self.pool.workers[wid].assigned.add(wire_id)
            self.pool.workers[wid].served += 1
        gen = m.Generate(
            request_id=wire_id,
            prompt_token_ids=stream.prompt_token_ids,
            params=m.params_to_dict(stream.params),
            decode_worker_id=decode.worker_id if decode else "",
            decode_endpoint=decode.kv_endpoint if decode else "",
            prior_output_ids=list(stream.generated),
        )
        return await self._send(first.worker_id, gen)

    async def _replan(
        self, stream: Stream, reason: str, failed: str, recompute_on: str | None = None
    ) -> None:
        """Abandon the current attempt (its live workers are told to drop it) and start the
        next one; raises RequestFailed when there is nowhere left to go."""
        avoid = {failed}
        while True:
            old = stream.wire_id
            await self._end_attempt(stream, abort=True)
            if stream.attempts >= self.config.max_attempts:
                raise RequestFailed(f"{reason}; gave up after {stream.attempts} attempts", 503)
            blocks = stream.blocks_needed(self.block_size)
            resumed = bool(stream.generated) or recompute_on is not None
            plan = self.pool.plan(blocks, resumed, frozenset(avoid), recompute_on)
            if plan is None:
                raise RequestFailed(f"{reason}; no worker is left to resume the request", 503)
            logger.warning(
                "request %s: %s; resuming on %s after %d tokens (attempt %s)",
                stream.request_id,
                reason,
                plan[0].worker_id,
                len(stream.generated),
                old,
            )
            if await self._launch(stream, *plan):
                return
            avoid.add(plan[0].worker_id)
            reason = f"worker {plan[0].worker_id} is unreachable"

    async def _end_attempt(self, stream: Stream, abort: bool) -> None:
        self.attempts.pop(stream.wire_id, None)
        workers, stream.workers = stream.workers, []
        for wid in workers:
            w = self.pool.workers.get(wid)
            if w is None:
                continue
            w.assigned.discard(stream.wire_id)
            if abort and w.state != "dead":
                await self._send(wid, m.Abort(request_id=stream.wire_id))

    async def _next(self, stream: Stream):
        if stream.deadline is None:
            return await stream.queue.get()
        left = stream.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(stream.queue.get(), max(left, 0.0))
        except TimeoutError:
            limit = self.config.request_timeout_s
            raise RequestFailed(f"the request did not finish within {limit:g} s", 504) from None

    async def _relay(self, stream: Stream) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while True:
                msg = await self._next(stream)
                if isinstance(msg, WorkerLost):
                    if msg.wire_id == stream.wire_id:
                        # A prefill worker lost after the first token: recompute where the
                        # request was to decode. Before it: another prefill worker retries.
                        w = stream.workers
                        on = w[1] if len(w) == 2 and w[0] == msg.worker_id else None
                        on = on if stream.generated else None
                        await self._replan(stream, msg.reason, msg.worker_id, recompute_on=on)
                    continue
                if msg.request_id != stream.wire_id:
                    continue  # a late message of an abandoned attempt
                if isinstance(msg, m.RequestFailed) and msg.retry:
                    # A failed handoff falls back to recomputing where the request decodes.
                    handoff_failed = len(stream.workers) == 2 and msg.worker_id == stream.workers[0]
                    target = stream.workers[1] if handoff_failed else None
                    await self._replan(stream, msg.error, msg.worker_id, recompute_on=target)
                    continue
                if isinstance(msg, m.RequestFailed):  # the request's own fault: the client's error
                    finished = True
                    raise RequestFailed(f"worker {msg.worker_id}: {msg.error}", 500)
                if msg.finish_reason is None and not msg.token_ids:
                    continue
                stream.generated.extend(msg.token_ids)
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
            self.streams.pop(stream.request_id, None)
            await self._end_attempt(stream, abort=not finished)

    async def abort(self, request_id: str) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            await self._end_attempt(stream, abort=True)
