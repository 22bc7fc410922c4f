"""The length rule: prompt + max_tokens fits the context, and None gets the room left."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from baton.scheduler.limits import ContextLengthExceeded, settle_max_tokens


def test_none_gets_the_room_the_prompt_leaves():
    assert settle_max_tokens(20, None, 32) == 12
    assert settle_max_tokens(31, None, 32) == 1
    assert settle_max_tokens(20, 12, 32) == 12  # exactly at the limit
    assert settle_max_tokens(20, 5, 32) == 5


def test_what_does_not_fit_is_refused_naming_the_field_and_the_numbers():
    with pytest.raises(
        ContextLengthExceeded,
        match=r"max_tokens: prompt \(60 tokens\) \+ "
        r"max_tokens \(10\) exceeds the context length of 64 tokens",
    ) as e:
        settle_max_tokens(60, 10, 64)
    assert (e.value.prompt_len, e.value.max_tokens, e.value.max_model_len) == (60, 10, 64)
    for max_tokens in (None, 1):
        with pytest.raises(
            ValueError,
            match="prompt: 64 tokens leave no room to generate "
            "within the context length of 64 tokens",
        ):
            settle_max_tokens(64, max_tokens, 64)


@given(st.integers(1, 100), st.none() | st.integers(1, 100), st.integers(1, 100))
def test_a_settled_request_fits_and_settling_again_changes_nothing(prompt, max_tokens, limit):
    try:
        settled = settle_max_tokens(prompt, max_tokens, limit)
    except ContextLengthExceeded:
        assert prompt + (max_tokens or 1) > limit
        return
    assert settled >= 1 and prompt + settled <= limit
    assert max_tokens is None or settled == max_tokens
    assert settle_max_tokens(prompt, settled, limit) == settled
