"""Every failure is an OpenAI-shaped error with the right status, and never shows a traceback."""

from __future__ import annotations

import openai
import pytest

from tests.server.api.conftest import ALIAS, Server, error_of

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "hi"}]


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="nope", prompt=PROMPT)
    err = error_of(
        server.post("/v1/chat/completions", json={"model": "nope", "messages": CHAT}), 404
    )
    assert err["param"] == "model" and err["code"] == "model_not_found" and "nope" in err["message"]
    assert server.cluster.calls == []


def test_unknown_route_is_404_in_the_same_shape(server):
    error_of(server.get("/v1/nothing"), 404)
    error_of(server.get("/v1/completions"), 405)


def test_api_key(cluster):
    s = Server(cluster, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").completions.create(model=ALIAS, prompt=PROMPT)
        err = error_of(s.post("/v1/completions", json={"model": ALIAS, "prompt": "x"}), 401)
        assert err["code"] == "invalid_api_key"
        # checked before the body is parsed
        error_of(s.post("/v1/completions", content=b"{oops"), 401)
        error_of(s.get("/v1/models"), 401)
        assert cluster.calls == []
        r = s.client().completions.create(model=ALIAS, prompt=PROMPT, max_tokens=3)
        assert r.usage.completion_tokens == 3
        assert s.get("/health").status_code == 200  # probes stay open (see test_auth.py)
    finally:
        s.stop()


def test_context_overflow_states_both_numbers(server, tokenizer):
    n_prompt = len(tokenizer.encode(PROMPT))
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=ALIAS, prompt=PROMPT, max_tokens=1000)
    assert e.value.status_code == 400
    err = e.value.body
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    assert "128" in err["message"] and str(n_prompt + 1000) in err["message"]
    # with no max_tokens, the prompt alone must leave room for one token
    long_chat = [{"role": "user", "content": "word " * 200}]
    r = server.post("/v1/chat/completions", json={"model": ALIAS, "messages": long_chat})
    err = error_of(r, 400)
    assert err["param"] == "messages" and "128" in err["message"]
    n_long = len(tokenizer.apply_chat_template(long_chat, add_generation_prompt=True)["input_ids"])
    assert str(n_long) in err["message"]
    # exactly at the limit is fine
    r = server.client().completions.create(model=ALIAS, prompt=PROMPT, max_tokens=128 - n_prompt)
    assert r.choices[0].text
    assert len(server.cluster.calls) == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logprobs": 50}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 10**9]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"model": None}, "model"),
    ],
)
def test_invalid_fields_are_400_naming_the_param(server, body, param):
    err = error_of(
        server.post("/v1/completions", json={"model": ALIAS, "prompt": "x", **body}), 400
    )
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param in err["message"]
    assert server.cluster.calls == []


def test_chat_body_errors(server):
    err = error_of(server.post("/v1/chat/completions", json={"model": ALIAS, "messages": []}), 400)
    assert err["param"] == "messages"
    body = {"model": ALIAS, "messages": CHAT, "top_logprobs": 2}
    assert error_of(server.post("/v1/chat/completions", json=body), 400)["param"] == "top_logprobs"


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2", '{"model": "\u00e9'.encode()])
def test_malformed_json_is_400(server, content):
    headers = {"content-type": "application/json"}
    err = error_of(server.post("/v1/completions", content=content, headers=headers), 400)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True])
def test_no_worker_is_503_with_retry_after(server, stream):
    server.cluster.unavailable = "decode"
    body = {"model": ALIAS, "prompt": PROMPT, "stream": stream}
    r = server.post("/v1/completions", json=body)
    err = error_of(r, 503)
    assert r.headers["retry-after"] == "1" and "decode" in err["message"]
    with pytest.raises(openai.InternalServerError) as e:
        server.client().chat.completions.create(model=ALIAS, messages=CHAT)
    assert e.value.status_code == 503


def test_no_worker_for_the_second_choice_aborts_the_first(server):
    server.cluster.unavailable, server.cluster.unavailable_after = "prefill", 1
    r = server.post("/v1/completions", json={"model": ALIAS, "prompt": PROMPT, "n": 2})
    error_of(r, 503)
    ((rid, _, _),) = server.cluster.calls
    assert rid.endswith("-0") and server.cluster.aborted == [rid]


def test_cluster_failure_is_500_without_details(server, caplog):
    server.cluster.fail_on_generate = True
    r = server.post("/v1/completions", json={"model": ALIAS, "prompt": PROMPT})
    err = error_of(r, 500)
    assert err["message"] == "internal error" and err["type"] == "server_error"
    assert "secret" not in r.text and "Traceback" not in r.text
    assert "secret cluster detail" in caplog.text  # logged instead


def test_failure_mid_json_is_500_and_aborts(server):
    server.cluster.script.fail_at = 3
    r = server.post("/v1/completions", json={"model": ALIAS, "prompt": PROMPT})
    assert error_of(r, 500)["message"] == "internal error" and "secret" not in r.text
    assert server.cluster.aborted == [server.cluster.calls[0][0]]


def test_failure_mid_stream_ends_with_an_error_event(server):
    server.cluster.script.fail_at = 3
    body = {"model": ALIAS, "prompt": PROMPT, "stream": True}
    r = server.post("/v1/completions", json=body)
    assert r.status_code == 200
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"internal error"' in events[-2] and "secret" not in r.text
    assert server.cluster.aborted == [server.cluster.calls[0][0]]
