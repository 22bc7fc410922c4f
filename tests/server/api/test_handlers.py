"""Completions and chat through the official openai client against the app on a FakeCluster:
text, usage, stop strings, n > 1, logprobs, the context guard and client disconnects."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.api.conftest import ALIAS, MODEL, TEXT, wait_for

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def chat_prompt_ids(tokenizer) -> list[int]:
    out = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_completion(server, tokenizer):
    r = server.client().completions.create(model=ALIAS, prompt=PROMPT, max_tokens=50)
    prompt_ids = tokenizer.encode(PROMPT)
    ((rid, seen_prompt, params),) = server.cluster.calls
    assert rid == r.id and seen_prompt == prompt_ids
    assert params.n == 1 and params.stop == () and params.max_tokens == 50
    assert r.choices[0].text == TEXT  # the EOS token adds no text
    assert r.choices[0].finish_reason == "stop"
    assert r.model == ALIAS and r.object == "text_completion"
    n_out = len(server.cluster.script.tokens)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), n_out)
    assert r.usage.total_tokens == len(prompt_ids) + n_out
    assert server.cluster.aborted == []  # finished by the cluster: nothing to abort


def test_completion_streamed_with_usage(server):
    chunks = list(
        server.client().completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=6, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert TEXT.startswith(text) and len(text) > 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_chat(server, tokenizer):
    r = server.client().chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=50)
    assert server.cluster.calls[0][1] == chat_prompt_ids(tokenizer)
    assert server.cluster.calls[0][2].max_tokens == 50
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == TEXT
    assert r.usage.prompt_tokens == len(chat_prompt_ids(tokenizer))
    assert r.usage.completion_tokens == len(server.cluster.script.tokens)


def test_chat_streamed(server):
    stream = server.client().chat.completions.create(
        model=ALIAS, messages=CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(server.cluster.script.tokens)


def test_multibyte_characters_are_never_split(server, tokenizer):
    ids = tokenizer.encode(" 🦜", add_special_tokens=False)
    assert all("🦜" not in tokenizer.decode([t]) for t in ids)  # the emoji spans tokens
    stream = server.client().completions.create(
        model=ALIAS, prompt=PROMPT, max_tokens=50, stream=True
    )
    deltas = [c.choices[0].text for c in stream]
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)


def split_stop(tokenizer, tokens, stop):
    """The text before `stop` and the number of tokens it takes to complete it."""
    for k in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:k])
        if stop in text:
            return text[: text.index(stop)], k
    raise AssertionError(stop)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(server, tokenizer, stream, include):
    stop = "tal of Fr"  # starts inside " capital", ends inside " France"
    tokens = server.cluster.script.tokens
    assert not any(stop in tokenizer.decode([t]) for t in tokens)
    before, n_tokens = split_stop(tokenizer, tokens, stop)
    kw = {"model": ALIAS, "prompt": PROMPT, "max_tokens": 50, "stop": [stop, "never"]}
    kw["extra_body"] = {"include_stop_str_in_output": include}
    want = before + stop if include else before
    c = server.client()
    if stream:
        chunks = list(c.completions.create(stream=True, **kw))
        deltas = [ch.choices[0].text for ch in chunks]
        assert "".join(deltas) == want
        if not include:  # no piece of the stop string was ever sent
            assert not any(d.endswith(("t", "ta", "tal")) for d in deltas)
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        r = c.completions.create(**kw)
        assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
        assert r.choices[0].model_extra["stop_reason"] == stop
        assert r.usage.completion_tokens == n_tokens
    ((rid, _, params),) = server.cluster.calls
    assert params.stop == ()  # the cluster never sees stop strings
    wait_for(lambda: server.cluster.aborted == [rid])


def test_stop_string_inside_a_many_token_event(server, tokenizer):
    """Tokens after the hit in the same event are neither emitted nor counted."""
    server.cluster.script.per_event = 5
    stop = "capital"
    before, n_tokens = split_stop(tokenizer, server.cluster.script.tokens, stop)
    r = server.client().completions.create(model=ALIAS, prompt=PROMPT, max_tokens=50, stop=stop)
    assert n_tokens % 5 != 0  # the hit is not the event's last token
    assert r.choices[0].text == before and r.usage.completion_tokens == n_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_n_fans_out_with_seeds_and_merges(server, stream):
    server.cluster.script.delay = 0.005
    kw = {"model": ALIAS, "prompt": PROMPT, "max_tokens": 8, "n": 2, "seed": 7}
    c = server.client()
    if stream:
        chunks = list(
            c.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
        )
        choices = [ch.choices[0] for ch in chunks if ch.choices]
        order = [ch.index for ch in choices]
        texts = ["".join(ch.text for ch in choices if ch.index == i) for i in (0, 1)]
        assert order.index(1) < len(order) - 1 - order[::-1].index(0)  # interleaved
        rid, usage = chunks[0].id, chunks[-1].usage
    else:
        r = c.completions.create(**kw)
        assert [ch.index for ch in r.choices] == [0, 1]
        texts = [ch.text for ch in r.choices]
        rid, usage = r.id, r.usage
    calls = sorted(server.cluster.calls, key=lambda call: call[0])
    assert [call[0] for call in calls] == [f"{rid}-0", f"{rid}-1"]
    assert [call[2].seed for call in calls] == [7, 8]
    assert all(call[2].n == 1 for call in calls)
    assert texts[0] == texts[1] and TEXT.startswith(texts[0]) and texts[0]
    assert usage.completion_tokens == 16 and usage.prompt_tokens == len(calls[0][1])


def test_completion_logprobs(server, tokenizer):
    r = server.client().completions.create(model=ALIAS, prompt=PROMPT, max_tokens=5, logprobs=2)
    tokens = server.cluster.script.tokens[:5]
    lp = r.choices[0].logprobs
    assert server.cluster.calls[0][2].logprobs == 2
    assert lp.tokens == [tokenizer.decode([t]) for t in tokens]
    assert lp.token_logprobs == [-0.5 - i for i in range(5)]
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.top_logprobs[1][tokenizer.decode([tokens[1]])] == -1.5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_chat_logprobs_streamed_cover_every_token(server, tokenizer):
    stream = server.client().chat.completions.create(
        model=ALIAS, messages=CHAT, max_tokens=30, logprobs=True, top_logprobs=1, stream=True
    )
    logprobs = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    entries = [e for lp in logprobs for e in lp.content]
    tokens = server.cluster.script.tokens
    assert [e.token for e in entries] == [tokenizer.decode([t]) for t in tokens]
    assert [e.logprob for e in entries] == [-0.5 - i for i in range(len(tokens))]
    assert all(len(e.top_logprobs) == 1 for e in entries)
    assert entries[0].bytes == list(entries[0].token.encode())


def test_no_max_tokens_stops_at_the_context_length(server, tokenizer):
    server.cluster.script.tokens = server.cluster.script.tokens[:-1] * 30  # longer than 128
    r = server.client().chat.completions.create(model=ALIAS, messages=CHAT)
    room = server.cluster.max_model_len - len(chat_prompt_ids(tokenizer))
    assert server.cluster.calls[0][2].max_tokens == room  # settled here, once
    assert r.usage.completion_tokens == room and r.choices[0].finish_reason == "length"
    assert server.cluster.aborted == []  # the cluster stopped at the settled max_tokens


def test_client_disconnect_mid_stream_aborts_every_choice(server):
    server.cluster.script.tokens = server.cluster.script.tokens[:-1] * 5
    server.cluster.script.delay = 0.02
    body = {"model": ALIAS, "prompt": PROMPT, "max_tokens": 60, "n": 2, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        rid = json.loads(first[6:])["id"]
        next(line for line in lines if line.startswith("data: "))
    want = {f"{rid}-0", f"{rid}-1"}
    wait_for(lambda: set(server.cluster.aborted) == want)
    wait_for(lambda: set(server.cluster.closed) == want)  # the cluster streams were closed too
    assert len(server.cluster.aborted) == 2


def test_client_disconnect_while_waiting_for_json_aborts(server):
    server.cluster.script.delay = 0.5
    body = {"model": ALIAS, "prompt": PROMPT, "max_tokens": 10}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    wait_for(lambda: len(server.cluster.calls) == 1)
    rid = server.cluster.calls[0][0]
    wait_for(lambda: server.cluster.aborted == [rid])
    wait_for(lambda: server.cluster.closed == [rid])
