"""The router's request side: places each request, relays its tokens, and resumes it elsewhere
when a worker it depends on is lost.

Failover: the router keeps every token it streamed. When a worker a request depends on dies
(its socket drops or its heartbeats stop), deregisters, or gives the request back (draining, a
failed KV handoff), the request is resumed elsewhere: the prompt plus the tokens already streamed
are recomputed on a decode-capable worker, so the client's stream goes on unbroken and greedy
output is what it would have been.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from baton.scheduler.kv_index import prompt_keys
from baton.scheduler.placement import Pool, WorkerState
from baton.scheduler.sampling_params import SamplingParams
from baton.server.api.cluster import NoWorkerAvailable, Overloaded, RequestFailed, TokenEvent
from baton.server.router.config import RouterConfig
from baton.server.router.stream import Attempt, Stream, WorkerLost
from baton.server.wire import messages as m
from baton.server.wire.params import params_to_dict

logger = logging.getLogger(__name__)

Send = Callable[[str, object], Awaitable[bool]]  # (worker id, message) -> whether it was sent


class RequestRelay:
    """The requests in flight, by id and by the id of their current attempt on the wire."""

    def __init__(
        self, config: RouterConfig, pool: Pool, block_size: int, send: Send, metrics=None
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.pool = pool
        self.block_size = block_size
        self.send = send
        self.streams: dict[str, Stream] = {}  # by request id
        self.by_wire_id: dict[str, Stream] = {}  # by the id of their current attempt

    # ---- what the workers report ------------------------------------------------------------

    def deliver(self, msg: m.TokenOutput | m.RequestFailed) -> None:
        stream = self.by_wire_id.get(msg.request_id)
        if stream is not None:
            stream.queue.put_nowait(msg)

    def handed_off(self, wire_id: str, worker_id: str) -> None:
        """The KV arrived: the request no longer depends on its prefill worker."""
        stream = self.by_wire_id.get(wire_id)
        if stream is not None and stream.attempt.hands_off_from(worker_id):
            stream.attempt.prefill = None
            self.pool.release(wire_id, worker_id)

    def lost(self, wire_id: str, worker_id: str, reason: str) -> None:
        """A worker the attempt depends on is gone (see `_relay`)."""
        stream = self.by_wire_id.get(wire_id)
        if stream is not None:
            stream.queue.put_nowait(WorkerLost(wire_id, worker_id, reason))

    # ---- the requests -----------------------------------------------------------------------

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
        stream.keys = prompt_keys(stream.prompt_token_ids, self.block_size, params.cache_salt)
        plan = self.pool.plan(
            blocks, resumed=False, keys=stream.keys, num_tokens=len(stream.prompt_token_ids)
        )
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
        self.by_wire_id[wire_id] = stream
        stream.attempt = Attempt(first.worker_id, decode.worker_id if decode else None)
        self.pool.assign(wire_id, stream.attempt.involved, stream.blocks_needed(self.block_size))
        if self.metrics is not None and not stream.generated:
            cached = self.pool.index.matched(first.worker_id, stream.keys) * self.block_size
            local = decode is None and self.pool.mode == "disagg"
            self.metrics.observe_routing(cached, handed_off=decode is not None, local=local)
        gen = m.Generate(
            request_id=wire_id,
            prompt_token_ids=stream.prompt_token_ids,
            params=params_to_dict(stream.params),
            decode_worker_id=decode.worker_id if decode else "",
            decode_endpoint=decode.kv_endpoint if decode else "",
            prior_output_ids=list(stream.generated),
        )
        return await self.send(first.worker_id, gen)

    async def _replan(
        self, stream: Stream, reason: str, failed: str, recompute_on: str | None = None
    ) -> None:
        """Abandon the current attempt (its live workers are told to drop it) and start the
        next one; raises RequestFailed when there is nowhere left to go."""
        avoid = {failed}
        while True:
            old = stream.wire_id
            await self._end_attempt(stream, abort=True)
            if stream.num_attempts >= self.config.max_attempts:
                raise RequestFailed(f"{reason}; gave up after {stream.num_attempts} attempts", 503)
            blocks = stream.blocks_needed(self.block_size)
            resumed = bool(stream.generated) or recompute_on is not None
            plan = self.pool.plan(blocks, resumed, frozenset(avoid), recompute_on, keys=stream.keys)
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
        self.by_wire_id.pop(stream.wire_id, None)
        ended, stream.attempt = stream.attempt, Attempt()
        for wid in ended.involved:
            w = self.pool.workers.get(wid)
            if w is None:
                continue
            self.pool.release(stream.wire_id, wid)
            if abort and w.state != "dead":
                await self.send(wid, m.Abort(request_id=stream.wire_id))

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
                        handing_off = stream.attempt.hands_off_from(msg.worker_id)
                        on = stream.attempt.decode if handing_off and stream.generated else None
                        await self._replan(stream, msg.reason, msg.worker_id, recompute_on=on)
                    continue
                if msg.request_id != stream.wire_id:
                    continue  # a late message of an abandoned attempt
                if isinstance(msg, m.RequestFailed) and msg.retry:
                    # A failed handoff falls back to recomputing where the request decodes.
                    handoff_failed = stream.attempt.hands_off_from(msg.worker_id)
                    target = stream.attempt.decode if handoff_failed else None
                    await self._replan(stream, msg.error, msg.worker_id, recompute_on=target)
                    continue
                if isinstance(msg, m.RequestFailed):  # the request's own fault: the client's error
                    finished = True
                    if msg.bad_request:
                        raise RequestFailed(msg.error, 400)
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
