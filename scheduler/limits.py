"""The length rule: a prompt and the tokens it may generate fit the context (pure Python).

Settled once, where a request arrives: the router's API layer, or the engine for offline use.
Workers then check only capacity (KV blocks, sequences).
"""

from __future__ import annotations

import dataclasses

from baton.scheduler.sampling_params import SamplingParams


class ContextLengthExceeded(ValueError):
    """The prompt (and `max_tokens`, when given) do not fit `max_model_len`. The numbers stay
    on the error, so the HTTP layer can word it for OpenAI clients."""

    def __init__(self, prompt_len: int, max_tokens: int | None, max_model_len: int) -> None:
        self.prompt_len, self.max_tokens, self.max_model_len = prompt_len, max_tokens, max_model_len
        if prompt_len >= max_model_len:
            msg = (
                f"prompt: {prompt_len} tokens leave no room to generate within the "
                f"context length of {max_model_len} tokens"
            )
        else:
            msg = (
                f"max_tokens: prompt ({prompt_len} tokens) + max_tokens "
                f"({max_tokens}) exceeds the context length of {max_model_len} tokens"
            )
        super().__init__(msg)


def settle_max_tokens(prompt_len: int, max_tokens: int | None, max_model_len: int) -> int:
    """The max_tokens a request runs with: None gets the room left after the prompt. Raises
    ContextLengthExceeded when the prompt leaves no room, or prompt + max_tokens does not fit."""
    if prompt_len >= max_model_len or (
        max_tokens is not None and prompt_len + max_tokens > max_model_len
    ):
        raise ContextLengthExceeded(prompt_len, max_tokens, max_model_len)
    return max_model_len - prompt_len if max_tokens is None else max_tokens


def bound_params(
    params: SamplingParams, prompt_len: int, max_model_len: int, extra_eos: tuple[int, ...] = ()
) -> SamplingParams:
    """`params` as an engine runs them: max_tokens settled (behind a router it arrives settled;
    offline this settles it) and the model's other end-of-sequence ids as stop tokens."""
    params = dataclasses.replace(
        params, max_tokens=settle_max_tokens(prompt_len, params.max_tokens, max_model_len)
    )
    if extra_eos and not params.ignore_eos:
        merged = tuple(dict.fromkeys(params.stop_token_ids + tuple(extra_eos)))
        params = dataclasses.replace(params, stop_token_ids=merged)
    return params


def check_prior(prior: list[int], params: SamplingParams, handoff: bool) -> list[int]:
    """The tokens a resumed request already generated, if it may resume with them."""
    if not prior:
        return []
    if handoff or params.n != 1:
        raise ValueError("prior_output_ids: only a single colocated sequence can resume")
    if len(prior) >= params.max_tokens:
        raise ValueError(
            f"prior_output_ids: {len(prior)} tokens already reach max_tokens ({params.max_tokens})"
        )
    return list(prior)
