"""The length rule: a prompt and the tokens it may generate fit the context (pure Python).

Settled once, where a request arrives: the router's API layer, or the engine for offline use.
Workers then check only capacity (KV blocks, sequences).
"""

from __future__ import annotations


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
