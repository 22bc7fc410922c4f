"""Hostile bodies: each is a 4xx OpenAI-shaped error naming what is wrong, never a 5xx, nothing
reaches the cluster, and the server answers a normal request right after."""

from __future__ import annotations

import json

import pytest

from tests.server.api.conftest import ALIAS, error_of

CHAT = [{"role": "user", "content": "hi"}]
DEPTH = 100_000
JSON = {"content-type": "application/json"}


@pytest.fixture(autouse=True)
def still_serves(server):
    """Runs the test, then checks no request was placed and a plain one is answered."""
    yield
    assert server.cluster.calls == []
    assert server.get("/health").status_code == 200
    r = server.post("/v1/completions", json={"model": ALIAS, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "content",
    [
        b"[" * DEPTH + b"]" * DEPTH,
        b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
        b'{"model": "fake", "prompt": ' + b"[" * DEPTH + b"]" * DEPTH + b"}",
    ],
    ids=["lists", "objects", "in-a-field"],
)
def test_deep_nesting_is_400_not_a_recursion_error(server, content):
    err = error_of(server.post("/v1/completions", content=content, headers=JSON), 400)
    assert "nested too deeply" in err["message"]


def test_invalid_utf8_is_400(server):
    content = b'{"model": "fake", "prompt": "caf\xc3\x28 \xff\xfe"}'
    err = error_of(server.post("/v1/completions", content=content, headers=JSON), 400)
    assert "UTF-8" in err["message"]


@pytest.mark.parametrize(
    ("content", "headers", "says"),
    [
        (b"hello there", JSON, "malformed JSON"),
        (b"model=fake&prompt=x", {"content-type": "application/x-www-form-urlencoded"}, "JSON"),
        (b'{"model": "fake", "prompt": "x"}', {"content-type": "text/plain"}, "JSON"),
        (b"\x00\x01\x02\x03", {"content-type": "application/octet-stream"}, "JSON"),
        (b'{"max_tokens": 1' + b"0" * 5000 + b"}", JSON, "malformed JSON"),
    ],
    ids=["text-as-json", "form", "text-plain", "binary", "5000-digit-number"],
)
def test_a_body_that_is_not_json_is_400(server, content, headers, says):
    err = error_of(server.post("/v1/completions", content=content, headers=headers), 400)
    assert says in err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("value", [[1, 2], "a string", 42, None, True, []])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_json_that_is_not_an_object_is_400(server, path, value):
    r = server.post(path, content=json.dumps(value).encode(), headers=JSON)
    assert "must be a JSON object" in error_of(r, 400)["message"]


HUGE = 10**30


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"max_tokens": HUGE}, "max_tokens"),
        ("/v1/completions", {"temperature": 1e308}, "temperature"),
        ("/v1/completions", {"top_p": -1e308}, "top_p"),
        ("/v1/completions", {"n": 10**9}, "n"),
        ("/v1/completions", {"n": -(10**9)}, "n"),
        ("/v1/completions", {"seed": HUGE}, "seed"),
        ("/v1/completions", {"top_k": HUGE}, "top_k"),
        ("/v1/completions", {"logprobs": 10**9}, "logprobs"),
        ("/v1/completions", {"stop_token_ids": [HUGE]}, "stop_token_ids"),
        ("/v1/completions", {"stop_token_ids": [10**6]}, "stop_token_ids"),
        ("/v1/completions", {"stop": ["x" * 5000]}, "stop"),
        ("/v1/completions", {"stop": ["x"] * 10_000}, "stop"),
        ("/v1/completions", {"logit_bias": {"1": 1e308}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {str(i): 100 for i in range(50_000)}}, "logit_bias"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 10**9}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": HUGE}, "top_logprobs"),
        ("/v1/chat/completions", {"max_completion_tokens": HUGE}, "max_completion_tokens"),
        ("/v1/chat/completions", {"min_tokens": HUGE}, "min_tokens"),
        ("/v1/chat/completions", {"presence_penalty": -1e308}, "presence_penalty"),
    ],
)
def test_out_of_range_numbers_are_400_naming_the_field(server, path, body, param):
    base = {"model": ALIAS, "prompt": "x"} if "chat" not in path else {"model": ALIAS}
    base |= {"messages": CHAT} if "chat" in path else {}
    err = error_of(server.post(path, json=base | body), 400)
    assert err["param"] == param and param in err["message"], err
    assert len(err["message"]) < 1000  # the value is never echoed back whole


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_literals_are_400(server, literal):
    content = b'{"model": "fake", "prompt": "x", "temperature": ' + literal + b"}"
    err = error_of(server.post("/v1/completions", content=content, headers=JSON), 400)
    assert err["param"] == "temperature"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": 123}, "prompt"),
        ("/v1/completions", {"prompt": {"text": "x"}}, "prompt"),
        ("/v1/completions", {"prompt": [1.5]}, "prompt"),
        ("/v1/completions", {"stop": {}}, "stop"),
        ("/v1/completions", {"stop": [1]}, "stop"),
        ("/v1/completions", {"model": 5}, "model"),
        ("/v1/completions", {"n": "1"}, "n"),
        ("/v1/completions", {"max_tokens": 1.5}, "max_tokens"),
        ("/v1/completions", {"temperature": "hot"}, "temperature"),
        ("/v1/completions", {"stream": "yes"}, "stream"),
        ("/v1/completions", {"stream_options": "x"}, "stream_options"),
        ("/v1/completions", {"logit_bias": [1]}, "logit_bias"),
        ("/v1/completions", {"stop_token_ids": "1"}, "stop_token_ids"),
        ("/v1/chat/completions", {"messages": "x"}, "messages"),
        ("/v1/chat/completions", {"messages": {"role": "user"}}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": 1}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
        ("/v1/chat/completions", {"messages": [None]}, "messages"),
        ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ],
)
def test_wrong_types_are_400_naming_the_field(server, path, body, param):
    base = {"model": ALIAS, "prompt": "x"} if "chat" not in path else {"model": ALIAS}
    base |= {"messages": CHAT} if "chat" in path else {}
    err = error_of(server.post(path, json=base | body), 400)
    assert err["param"] == param and param in err["message"], err


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_missing_model_or_prompt_is_400(server, path):
    err = error_of(server.post(path, json={}), 400)
    assert err["param"] in ("model", "prompt", "messages")
