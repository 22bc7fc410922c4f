"""One HTTP request's n cluster requests: placed together, detokenized, cut at stop strings,
merged into one stream of per-choice deltas. `close` is the one place that aborts them."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from baton.scheduler.sampling_params import SamplingParams
from baton.server.api.cluster import Cluster, TokenEvent
from baton.server.api.metrics import Metrics
from baton.server.detokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


@dataclass
class Delta:
    """What one choice added: text to emit now and the tokens consumed since its last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list | None  # wire entries [token_id, logprob, [[id, logprob], ...]] of token_ids
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Choice:
    index: int
    request_id: str
    params: SamplingParams  # what the cluster sees: n == 1, no stop strings
    detok: IncrementalDetokenizer
    limit: int  # output tokens allowed: the settled max_tokens
    iterator: AsyncIterator[TokenEvent] | None = None
    num_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    cluster_done: bool = False  # the cluster finished it: nothing to abort
    aborted: bool = False
    last_token_at: float | None = None
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list = field(default_factory=list)


class FanOut:
    """`params` arrive with max_tokens settled (see Handlers.settle_params)."""

    def __init__(
        self,
        cluster: Cluster,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        metrics: Metrics,
        arrival: float,
    ) -> None:
        self.cluster, self.metrics, self.arrival = cluster, metrics, arrival
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        ids = [request_id] if params.n == 1 else [f"{request_id}-{i}" for i in range(params.n)]
        self.choices: list[_Choice] = []
        for i, rid in enumerate(ids):
            sub = dataclasses.replace(params.choice(i), stop=())
            detok = IncrementalDetokenizer(cluster.tokenizer, prompt_token_ids, params)
            self.choices.append(_Choice(i, rid, sub, detok, params.max_tokens))
        self._queue: asyncio.Queue[Delta | Exception] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._first: Delta | Exception | None = None  # taken early by wait_first

    @property
    def num_generated_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    @property
    def num_cached_tokens(self) -> int:
        return max(c.num_cached_tokens for c in self.choices)

    async def start(self) -> None:
        """Places every choice; if one cannot be placed (NoWorkerAvailable), aborts the rest."""
        try:
            for c in self.choices:
                it = self.cluster.generate(c.request_id, self.prompt_token_ids, c.params)
                c.iterator = await it if inspect.isawaitable(it) else it
        except BaseException:
            await self.close()
            raise
        self.metrics.observe_prompt(len(self.prompt_token_ids))
        self._tasks = [asyncio.create_task(self._read_choice(c)) for c in self.choices]

    async def wait_first(self) -> Delta | Exception:
        """The first delta or failure, without consuming it (`deltas` starts with it)."""
        if self._first is None:
            self._first = await self._queue.get()
        return self._first

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every choice's deltas as they come, until each has finished."""
        remaining = len(self.choices)
        while remaining:
            if self._first is not None:
                item, self._first = self._first, None
            else:
                item = await self._queue.get()
            if isinstance(item, Exception):
                raise item
            remaining -= item.finish_reason is not None
            yield item

    async def close(self) -> None:
        """Idempotent: stops reading and aborts every choice the cluster has not finished."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self.choices:
            if c.iterator is None:
                continue
            if not c.cluster_done:
                await self._abort(c)
            aclose = getattr(c.iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    logger.exception("closing the stream of %s failed", c.request_id)

    async def _abort(self, c: _Choice) -> None:
        if c.aborted:
            return
        try:
            await self.cluster.abort(c.request_id)
            c.aborted = True
        except Exception:
            logger.exception("aborting %s failed", c.request_id)

    async def _read_choice(self, c: _Choice) -> None:
        try:
            async for ev in c.iterator:
                delta = self._on_event(c, ev)
                if delta is not None:
                    self._queue.put_nowait(delta)
                if c.finish_reason is not None:
                    break
            if c.finish_reason is None:
                logger.warning("the stream of %s ended without a finish", c.request_id)
                c.cluster_done = True
                self._queue.put_nowait(self._finish(c, "abort", None))
        except Exception as e:
            self._queue.put_nowait(e)
            return
        if not c.cluster_done:  # we ended it (stop string, length): the cluster must stop too
            await self._abort(c)

    def _on_event(self, c: _Choice, ev: TokenEvent) -> Delta | None:
        c.num_cached_tokens = max(c.num_cached_tokens, ev.num_cached_tokens)
        text, overflow = "", False
        lps = ev.logprobs or []
        for k, tid in enumerate(ev.token_ids):
            if c.num_tokens >= c.limit:
                overflow = True
                break
            c.num_tokens += 1
            c.pending_ids.append(tid)
            if k < len(lps):
                c.pending_logprobs.append(lps[k])
            text += c.detok.add(tid)
            if c.detok.stop_hit is not None:
                break
        self._observe_tokens(c, ev)
        if c.detok.stop_hit is not None:
            return self._finish(c, "stop", c.detok.stop_hit, text)
        if ev.finish_reason is not None and not overflow:
            c.cluster_done = True
            return self._finish(c, ev.finish_reason, ev.stop_reason, text + c.detok.flush())
        if c.num_tokens >= c.limit:
            return self._finish(c, "length", None, text + c.detok.flush())
        if not text:
            return None  # tokens wait for the text they make (an incomplete char, a held stop)
        return self._delta(c, text)

    def _observe_tokens(self, c: _Choice, ev: TokenEvent) -> None:
        if not ev.token_ids:
            return
        now = time.monotonic()
        if c.last_token_at is None:
            self.metrics.observe_first_token(now - self.arrival)
            if len(ev.token_ids) > 1:
                self.metrics.observe_tokens(len(ev.token_ids) - 1, 0.0)
        else:
            self.metrics.observe_tokens(len(ev.token_ids), now - c.last_token_at)
        c.last_token_at = now

    def _delta(self, c: _Choice, text: str, **finish) -> Delta:
        logprobs = c.pending_logprobs if self.params.logprobs is not None else None
        d = Delta(c.index, text, c.pending_ids, logprobs, **finish)
        c.pending_ids, c.pending_logprobs = [], []
        return d

    def _finish(self, c: _Choice, reason: str, stop_reason, text: str = "") -> Delta:
        c.finish_reason = reason
        self.metrics.observe_finish(reason, time.monotonic() - self.arrival, c.num_tokens)
        return self._delta(c, text, finish_reason=reason, stop_reason=stop_reason)
