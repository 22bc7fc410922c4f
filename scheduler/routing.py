"""How the router chooses among the ready workers of a role (pure Python).

`kv` (the default) weighs what a worker already holds of the prompt against its queue:
    cost = uncached prompt tokens + load_weight * (requests running, waiting or just sent there)
and takes the cheapest (ties: the lower worker id). The decode worker is the one holding the
longest prefix of the prompt, then the most free blocks, then the shortest queue. `load` is the
least loaded prefill worker and the freest decode worker, whatever they hold; `round-robin`
takes the ready workers in turn.

Conditional disaggregation (disagg pools): a decode worker prefills the prompt itself when the
part of it that it does not hold is at most `max_local_prefill_tokens` tokens; or at most
`max_local_turn_tokens` when it holds more of the prompt than the prefill worker that would get
it (a next turn, whose history only the decode worker that answered holds); or when every
prefill worker has at least `prefill_backlog` requests (0: never).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

POLICIES = ("kv", "load", "round-robin")


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "kv"
    load_weight: int = 256  # tokens of prefill one queued request is worth
    max_local_prefill_tokens: int = 32
    max_local_turn_tokens: int = 128
    prefill_backlog: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"routing: must be one of {POLICIES}, got {self.policy!r}")
        bounds = (self.load_weight, self.max_local_prefill_tokens, self.max_local_turn_tokens)
        if min(*bounds, self.prefill_backlog) < 0:
            raise ValueError("routing weights and bounds must be non-negative")


@dataclass(frozen=True)
class Choice:
    worker: object  # a WorkerState
    cached_blocks: int  # leading prompt blocks it holds


class Chooser:
    def __init__(self, config: RoutingConfig, matched) -> None:
        """`matched(worker_id, keys)`: how many leading blocks of `keys` the worker holds."""
        self.config = config
        self._matched = matched
        self._turns = {"prefill": itertools.count(), "decode": itertools.count()}

    def _cached(self, w, keys: Sequence[int]) -> int:
        return self._matched(w.worker_id, keys) if keys else 0

    def prefill(self, cands: list, keys: Sequence[int], num_tokens: int, block_size: int):
        if not cands:
            return None
        cands = sorted(cands, key=lambda w: w.worker_id)
        if self.config.policy == "round-robin":
            w = cands[next(self._turns["prefill"]) % len(cands)]
            return Choice(w, self._cached(w, keys))
        if self.config.policy == "load":
            w = min(cands, key=lambda w: (w.load, w.worker_id))
            return Choice(w, self._cached(w, keys))
        scored = []
        for w in cands:
            cached = self._cached(w, keys)
            uncached = max(0, num_tokens - cached * block_size)
            scored.append((uncached + self.config.load_weight * w.load, w.worker_id, cached, w))
        cost, _, cached, w = min(scored, key=lambda s: s[:2])
        return Choice(w, cached)

    def decode(self, cands: list, keys: Sequence[int]):
        if not cands:
            return None
        cands = sorted(cands, key=lambda w: w.worker_id)
        if self.config.policy == "round-robin":
            w = cands[next(self._turns["decode"]) % len(cands)]
            return Choice(w, self._cached(w, keys))
        if self.config.policy == "load":
            w = min(cands, key=lambda w: (-w.num_free_blocks, w.load, w.worker_id))
            return Choice(w, self._cached(w, keys))
        scored = [
            (-self._cached(w, keys), -w.num_free_blocks, w.load, w.worker_id, w) for w in cands
        ]
        best = min(scored, key=lambda s: s[:4])
        return Choice(best[4], -best[0])

    def prefill_locally(
        self, decode: Choice, prefill: Choice, num_tokens: int, block_size: int, prefill_loads
    ) -> bool:
        """Whether the decode worker should prefill the prompt itself (`prefill`: the prefill
        worker the prompt would go to otherwise)."""
        uncached = max(0, num_tokens - decode.cached_blocks * block_size)
        if uncached <= self.config.max_local_prefill_tokens:
            return True
        # A conversation's next turn: its history lives on this decode worker only; computing
        # the new part here beats recomputing the history on a prefill worker.
        holds_more = decode.cached_blocks > prefill.cached_blocks
        if holds_more and uncached <= self.config.max_local_turn_tokens:
            return True
        backlog = self.config.prefill_backlog
        return bool(backlog) and all(load >= backlog for load in prefill_loads)
