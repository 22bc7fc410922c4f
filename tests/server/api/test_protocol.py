"""Request bodies: OpenAI fields and vLLM extras become SamplingParams; bad ones name the field."""

from __future__ import annotations

import pydantic
import pytest

from baton.server.api.protocol import MAX_STOP_CHARS, ChatCompletionRequest, CompletionRequest

CHAT = [{"role": "user", "content": "hi"}]


def test_completion_defaults_follow_openai():
    p = CompletionRequest(model="m", prompt="x").sampling_params()
    assert (p.max_tokens, p.temperature, p.top_p, p.n) == (16, 1.0, 1.0, 1)
    assert p.stop == () and p.logprobs is None and p.seed is None


def test_every_field_reaches_sampling_params():
    req = CompletionRequest.model_validate(
        {
            "model": "m",
            "prompt": [1, 2, 3],
            "max_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "n": 3,
            "stop": "END",
            "seed": 11,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "logprobs": 4,
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "ignore_eos": True,
            "stop_token_ids": [9, 10],
            "min_tokens": 2,
            "skip_special_tokens": False,
            "include_stop_str_in_output": True,
            "user": "ignored",
            "some_future_field": {"x": 1},
        }
    )
    p = req.sampling_params()
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.seed) == (7, 0.5, 0.9, 3, 11)
    assert p.stop == ("END",) and p.stop_token_ids == (9, 10)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (p.top_k, p.min_p, p.min_tokens, p.logprobs) == (5, 0.1, 2, 4)
    assert p.ignore_eos and not p.skip_special_tokens and p.include_stop_str_in_output


def test_null_means_the_default():
    nulls = ["n", "temperature", "top_p", "stop", "seed", "top_k", "min_p", "ignore_eos"]
    nulls += ["stop_token_ids", "min_tokens", "skip_special_tokens", "include_stop_str_in_output"]
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x"} | dict.fromkeys(nulls))
    assert req.sampling_params() == CompletionRequest(model="m", prompt="x").sampling_params()


def test_chat_max_completion_tokens_wins_and_default_is_the_context():
    assert ChatCompletionRequest(model="m", messages=CHAT).sampling_params().max_tokens is None
    req = ChatCompletionRequest(model="m", messages=CHAT, max_tokens=5, max_completion_tokens=9)
    assert req.sampling_params().max_tokens == 9
    assert (
        ChatCompletionRequest(model="m", messages=CHAT, max_tokens=5).sampling_params().max_tokens
        == 5
    )


@pytest.mark.parametrize(
    ("logprobs", "top", "want"), [(False, None, None), (True, None, 0), (True, 3, 3)]
)
def test_chat_logprobs_are_a_bool_and_a_count(logprobs, top, want):
    req = ChatCompletionRequest(model="m", messages=CHAT, logprobs=logprobs, top_logprobs=top)
    assert req.sampling_params().logprobs == want


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_completion_tokens": 0}, "max_tokens"),
        ({"stop": ["a"] * 17}, "stop"),
    ],
)
def test_bad_chat_values_name_their_field(body, field):
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": CHAT, **body})
    with pytest.raises(ValueError, match=f"^{field}:"):
        req.sampling_params()


def test_echo_is_refused_by_name():
    with pytest.raises(ValueError, match="^echo:"):
        CompletionRequest(model="m", prompt="x", echo=True).sampling_params()


def test_logit_bias_is_refused_by_name_not_ignored():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logit_bias": {"5": 1}})
    with pytest.raises(ValueError, match="^logit_bias:"):
        req.sampling_params()
    empty = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logit_bias": {}})
    assert empty.sampling_params() == CompletionRequest(model="m", prompt="x").sampling_params()


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "max_tokens": "5"},  # strict: a string is not a number
        {"prompt": "x", "n": True},
        {"prompt": [1, "a"]},
        {"prompt": "x", "stop": 3},
        {"prompt": "x", "top_k": 2**63},  # would not fit the router's frames
        {"prompt": "x", "min_tokens": -(2**63) - 1},
        {"prompt": "x", "stop": ["x" * (MAX_STOP_CHARS + 1)]},
        {},
    ],
)
def test_wrong_types_are_rejected(body):
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest.model_validate({"model": "m", **body})


def test_text_parts_are_joined_for_the_template():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": None},
                {"role": "user", "name": "ann", "content": [
                    {"type": "text", "text": "a"}, {"type": "text", "text": "b"},
                ]},
            ],
        }
    )  # fmt: skip
    assert [m.template_dict() for m in req.messages] == [
        {"role": "system", "content": ""},
        {"role": "user", "content": "a\nb", "name": "ann"},
    ]
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
        )


def test_cache_salt_reaches_sampling_params_and_is_bounded():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", "cache_salt": "tenant-7"})
    assert req.sampling_params().cache_salt == "tenant-7"
    assert (
        CompletionRequest.model_validate({"model": "m", "prompt": "x"}).sampling_params().cache_salt
        == ""
    )
    with pytest.raises(pydantic.ValidationError, match="cache_salt"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "cache_salt": "s" * 257})
