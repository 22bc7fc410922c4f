"""What the engine returns for a request: its completions so far, and whether it finished."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None
    # One entry per generated token: (token id, logprob, top [(id, logprob), ...]).
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    # Streaming: what this step added.
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    # Seconds from arrival to the first step that ran the request; None until it ran.
    queue_time: float | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass(frozen=True)
class CacheStats:
    """The batch and KV cache at a glance (a worker's heartbeat)."""

    num_running: int
    num_waiting: int
    usage: float
    num_free_blocks: int
    prefix_queries: int
    prefix_hits: int
