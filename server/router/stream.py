"""One request as the router follows it, across the attempts that failover may need."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from baton.scheduler.sampling_params import SamplingParams


@dataclass(frozen=True)
class WorkerLost:
    """Queued to a request's stream when a worker it depends on is gone."""

    wire_id: str  # the attempt that depended on the worker
    worker_id: str
    reason: str


@dataclass
class Attempt:
    """The workers one attempt of a request still depends on. `prefill` is the worker sent the
    request; `decode` the one its KV is handed to, or None when `prefill` runs it all. Once the
    KV has arrived, `prefill` is None: the request no longer depends on it."""

    prefill: str | None = None
    decode: str | None = None

    @property
    def involved(self) -> list[str]:
        return [w for w in (self.prefill, self.decode) if w is not None]

    def hands_off_from(self, worker_id: str) -> bool:
        """Whether `worker_id` is this attempt's prefill worker, its KV not handed over yet."""
        return self.decode is not None and self.prefill == worker_id


@dataclass
class Stream:
    """A request in flight. Each attempt has its own id on the wire (`wire_id`), so late
    messages of an abandoned attempt are told apart and dropped."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    started: float
    deadline: float | None
    # TokenOutput and RequestFailed of its attempts, WorkerLost: in the order they came
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    wire_id: str = ""
    attempt: Attempt = field(default_factory=Attempt)  # the current one; empty between them
    generated: list[int] = field(default_factory=list)  # every token streamed to the client
    num_attempts: int = 0
    keys: list[int] = field(default_factory=list)  # the prompt's block keys (see kv_index)

    def next_wire_id(self) -> str:
        self.num_attempts += 1
        n = self.num_attempts
        return self.request_id if n == 1 else f"{self.request_id}@{n}"

    def blocks_needed(self, block_size: int) -> int:
        """KV blocks for the prompt and every token it may generate (max_tokens is settled)."""
        return -(-(len(self.prompt_token_ids) + self.params.max_tokens) // block_size)
