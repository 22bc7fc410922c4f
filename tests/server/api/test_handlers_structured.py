"""What the handlers send a cluster for structured outputs and tools, and what they answer."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from baton.server.api.tools import TOOL_PROMPT
from tests.server.api.conftest import ALIAS, FakeCluster, Script, Server, error_of

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}</call>{% endfor %}{% endfor %}[assistant]"
)


@pytest.fixture(scope="module")
def tools_server(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOLS_TEMPLATE
    s = Server(FakeCluster.scripted(tok))
    yield s
    s.stop()


def sent_prompt(server) -> str:
    return server.cluster.tokenizer.decode(server.cluster.calls[-1][1])


def test_a_template_with_a_tool_format_gets_the_tools_and_the_calls(tools_server):
    s = tools_server
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    msgs = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "21C"},
    ]
    s.client().chat.completions.create(model=ALIAS, messages=msgs, tools=[WEATHER], max_tokens=4)
    prompt = sent_prompt(s)
    assert prompt.startswith("<tools>") and '"get_weather"' in prompt
    assert '<call>get_weather{"city": "Paris"}</call>' in prompt  # arguments as an object
    assert "[tool]21C" in prompt and "<tool_call>" not in prompt
    params = s.cluster.calls[-1][2]
    assert params.guided == ""  # auto: nothing forced


def test_a_template_without_one_gets_the_tool_prompt(server):
    server.cluster.max_model_len = 1024  # the tool prompt is long
    server.client().chat.completions.create(
        model=ALIAS, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=4
    )
    prompt = sent_prompt(server)
    assert TOOL_PROMPT.split("\n")[0] in prompt and '"get_weather"' in prompt
    params = server.cluster.calls[-1][2]
    assert params.guided == "lark" and "get_weather" in params.guided_spec
    assert params.extra["guided_field"] == "tools"


def test_constraints_reach_the_cluster_and_conflicts_are_400s(server):
    server.cluster.max_model_len = 1024
    c = server.client()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    c.chat.completions.create(
        model=ALIAS,
        messages=ASK,
        max_tokens=4,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    params = server.cluster.calls[-1][2]
    assert (params.guided, json.loads(params.guided_spec)) == ("json", schema)
    c.completions.create(
        model=ALIAS,
        prompt="x",
        max_tokens=4,
        extra_body={"structured_outputs": {"regex": "a+", "disable_any_whitespace": True}},
    )
    params = server.cluster.calls[-1][2]
    assert (params.guided, params.guided_spec, params.guided_compact) == ("regex", "a+", True)
    n = len(server.cluster.calls)
    r = server.post(
        "/v1/chat/completions",
        json={
            "model": ALIAS,
            "messages": ASK,
            "tools": [WEATHER],
            "tool_choice": "required",
            "response_format": {"type": "json_object"},
        },
    )
    assert error_of(r, 400)["param"] == "tool_choice"
    r = server.post(
        "/v1/chat/completions", json={"model": ALIAS, "messages": ASK, "tool_choice": "required"}
    )
    assert error_of(r, 400)["param"] == "tool_choice"
    assert len(server.cluster.calls) == n  # nothing placed


def test_streamed_and_whole_tool_calls_are_the_same(server):
    server.cluster.max_model_len = 1024
    tok = server.cluster.tokenizer
    text = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    server.cluster.script = Script(
        tok.encode(text, add_special_tokens=False) + [tok.eos_token_id],
        stop_reason=tok.eos_token_id,
        per_event=2,
    )
    c = server.client()
    kw = {"model": ALIAS, "messages": ASK, "tools": [WEATHER], "max_tokens": 100}
    whole = c.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Sure."
    (call,) = whole.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Oslo"},
    )
    content, calls, finish = "", {}, None
    for chunk in c.chat.completions.create(**kw, stream=True):
        for d in chunk.choices:
            content += d.delta.content or ""
            for tc in d.delta.tool_calls or []:
                e = calls.setdefault(tc.index, ["", ""])
                e[0] += tc.function.name or ""
                e[1] += tc.function.arguments or ""
            finish = d.finish_reason or finish
    assert content == "Sure." and finish == "tool_calls"
    assert [(n, json.loads(a)) for n, a in calls.values()] == [("get_weather", {"city": "Oslo"})]


def test_unknown_fields_are_ignored_and_logged_once(server, caplog):
    c = server.client()
    with caplog.at_level(logging.WARNING, logger="baton.server.api.handlers"):
        for _ in range(2):
            c.completions.create(
                model=ALIAS,
                prompt="x",
                max_tokens=2,
                extra_body={"guided_decoding_backend": "xgrammar"},
            )
    logged = [r for r in caplog.records if "guided_decoding_backend" in r.getMessage()]
    assert len(logged) == 1
