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
    workers: list[str] = field(default_factory=list)  # the attempt's workers still involved
    generated: list[int] = field(default_factory=list)  # every token streamed to the client
    attempts: int = 0

    def next_wire_id(self) -> str:
        self.attempts += 1
        return self.request_id if self.attempts == 1 else f"{self.request_id}@{self.attempts}"

    def blocks_needed(self, block_size: int) -> int:
        """KV blocks for the prompt and every token it may generate (max_tokens is settled)."""
        return -(-(len(self.prompt_token_ids) + self.params.max_tokens) // block_size)
