"""What the HTTP layer needs from whatever runs the requests (the ZeroMQ router, or a fake)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from baton.scheduler.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenEvent:
    token_ids: list[int]
    logprobs: list | None
    finish_reason: str | None
    stop_reason: int | None
    num_cached_tokens: int


class NoWorkerAvailable(Exception):
    """No ready worker of `role`: the HTTP layer answers 503 with Retry-After."""

    def __init__(self, role: str) -> None:
        super().__init__(f"no {role} worker is available")
        self.role = role


class Cluster(Protocol):
    model_name: str
    max_model_len: int
    tokenizer: Any

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        """Places the request (raising NoWorkerAvailable at once if it cannot), then returns
        its token events. `params.max_tokens` is settled: never None."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def health(self) -> tuple[bool, str]: ...

    def workers(self) -> list[dict]: ...


class Overloaded(Exception):
    """Every queue is full: the HTTP layer answers 429 with Retry-After, at once."""


class RequestFailed(Exception):
    """The request was placed but could not be finished (no worker left to resume it, its
    deadline passed, a worker refused it): `status` is the HTTP status it maps to (503, 504, 500,
    or 400 when the request itself is invalid)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status
