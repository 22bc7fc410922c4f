"""Tool calling: plans, the grammar of a forced choice, parsing calls out of (streamed) text."""

from __future__ import annotations

import json
from enum import StrEnum

import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from baton.server.api import protocol as p
from baton.server.api.structured import InvalidConstraint
from baton.server.api.tools import (
    OPEN_TAG,
    ToolCallStream,
    parse_tool_calls,
    plan_tools,
    template_has_tools,
    tool_constraint,
    tool_conversation,
)
from tests.server.guided.lark import lark_takes


class Unit(StrEnum):
    c = "c"
    f = "f"


class Place(BaseModel):
    city: str
    unit: Unit


class ForecastArgs(BaseModel):
    where: Place
    days: int


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string"}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    },
}
NO_PARAMS = {"type": "function", "function": {"name": "ping"}}
# pydantic writes nested models as "$defs" with "#/$defs/..." references
FORECAST = {
    "type": "function",
    "function": {"name": "forecast", "parameters": ForecastArgs.model_json_schema()},
}
TOOLS = [WEATHER, TIME, NO_PARAMS, FORECAST]


def chat(**fields) -> p.ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return p.ChatCompletionRequest.model_validate(body)


def plan(tools=TOOLS, **fields):
    return plan_tools(chat(tools=tools, **fields))


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def block(name: str, arguments, compact: bool = True) -> str:
    seps = (",", ":") if compact else (", ", ": ")
    body = json.dumps({"name": name, "arguments": arguments}, separators=seps)
    return f"<tool_call>\n{body}\n</tool_call>"


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


AUTO = plan()


# ---- plan_tools ------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["required", "auto", named("get_weather")])
def test_tool_choice_without_tools(choice):
    for tools in (None, []):
        with pytest.raises(InvalidConstraint) as e:
            plan_tools(chat(tools=tools, tool_choice=choice))
        assert e.value.field == "tool_choice" and "tools" in str(e.value)


@pytest.mark.parametrize("choice", [None, "none"])
def test_no_tools_no_plan(choice):
    assert plan_tools(chat(tool_choice=choice)) is None
    assert plan_tools(chat(tools=[], tool_choice=choice)) is None


def test_tool_choice_none_ignores_the_tools():
    assert plan(tool_choice="none") is None


@pytest.mark.parametrize("choice", [{}, {"tool_choice": None}, {"tool_choice": "auto"}])
def test_auto(choice):
    t = plan(**choice)
    assert (t.mode, t.name, t.forced, t.parallel) == ("auto", None, False, True)
    assert [x.function.name for x in t.tools] == ["get_weather", "get_time", "ping", "forecast"]


def test_required_and_named():
    t = plan(tool_choice="required")
    assert (t.mode, t.name, t.forced) == ("required", None, True)
    t = plan(tool_choice=named("get_time"))
    assert (t.mode, t.name, t.forced) == ("named", "get_time", True)


def test_named_function_not_among_the_tools():
    with pytest.raises(InvalidConstraint) as e:
        plan(tool_choice=named("get_wether"))
    assert e.value.field == "tool_choice" and "'get_wether'" in str(e.value)


def test_duplicate_names():
    with pytest.raises(InvalidConstraint) as e:
        plan(tools=[WEATHER, TIME, WEATHER])
    assert e.value.field == "tools" and "unique" in str(e.value)


@pytest.mark.parametrize(("given", "parallel"), [(False, False), (True, True), (None, True)])
def test_parallel_tool_calls(given, parallel):
    assert plan(parallel_tool_calls=given).parallel is parallel
    assert plan(parallel_tool_calls=given, tool_choice="required").parallel is parallel


# ---- tool_constraint -------------------------------------------------------------------------


def valid_spec(t) -> str:
    c = tool_constraint(t)
    assert (c.kind, c.field, c.compact) == ("lark", "tools", True)
    assert (
        llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(c.spec)) == ""
    )
    return c.spec


def test_auto_has_no_constraint():
    assert tool_constraint(AUTO) is None


GOOD = [
    block("get_weather", {"city": "Paris"}),
    block("get_weather", {"city": "Paris", "unit": "f"}),
    block("get_time", {"tz": "UTC"}),
    block("ping", {}),
    block("forecast", {"where": {"city": "Oslo", "unit": "c"}, "days": 3}),
]
BAD = {
    "unknown function": block("get_wether", {"city": "Paris"}),
    "missing required property": block("get_weather", {"unit": "c"}),
    "enum value not allowed": block("get_weather", {"city": "Paris", "unit": "k"}),
    "additional property refused": block("get_time", {"tz": "UTC", "x": 1}),
    "wrong type": block("get_time", {"tz": 3}),
    "enum value in a $defs model": block(
        "forecast", {"where": {"city": "Oslo", "unit": "k"}, "days": 3}
    ),
    "missing property of a $defs model": block("forecast", {"where": {"unit": "c"}, "days": 3}),
    "a key beside name and arguments": (
        '<tool_call>\n{"name":"get_time","arguments":{"tz":"UTC"},"id":"1"}\n</tool_call>'
    ),
    "no tags": json.dumps({"name": "get_time", "arguments": {"tz": "UTC"}}),
    "no call at all": "",
    "text instead": "I don't know.",
}


def test_required_takes_a_call_of_any_tool(lltok):
    spec = valid_spec(plan(tool_choice="required"))
    for text in GOOD:
        assert lark_takes(lltok, spec, text), text


@pytest.mark.parametrize("why", list(BAD))
def test_required_refuses_what_the_schemas_do_not_allow(lltok, why):
    spec = valid_spec(plan(tool_choice="required"))
    assert not lark_takes(lltok, spec, BAD[why])


def test_matcher_refuses_the_token_that_leaves_the_schema(lltok):
    spec = valid_spec(plan(tool_choice="required"))
    m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark(spec), log_level=0)
    results = [m.consume_token(t) for t in lltok.tokenize_str(BAD["enum value not allowed"])]
    assert False in results and m.is_error()


def test_parallel_calls(lltok):
    two = GOOD[0] + "\n" + GOOD[2]
    assert lark_takes(lltok, valid_spec(plan(tool_choice="required")), two)
    assert not lark_takes(
        lltok, valid_spec(plan(tool_choice="required", parallel_tool_calls=False)), two
    )
    single = valid_spec(plan(tool_choice="required", parallel_tool_calls=False))
    assert lark_takes(lltok, single, GOOD[0])


def test_named_takes_only_that_function(lltok):
    spec = valid_spec(plan(tool_choice=named("get_time")))
    assert lark_takes(lltok, spec, block("get_time", {"tz": "UTC"}))
    assert not lark_takes(lltok, spec, block("get_weather", {"city": "Paris"}))
    spec = valid_spec(plan(tool_choice=named("forecast"), parallel_tool_calls=False))
    assert lark_takes(lltok, spec, GOOD[-1])
    assert not lark_takes(lltok, spec, GOOD[-1] + "\n" + GOOD[-1])
    assert not lark_takes(lltok, spec, GOOD[0])


def test_what_the_grammar_takes_parses_back(lltok):
    t = plan(tool_choice="required")
    spec = valid_spec(t)
    text = "\n".join(GOOD)
    assert lark_takes(lltok, spec, text)
    content, calls = parse_tool_calls(text, t)
    assert content is None
    assert calls_of(calls) == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Paris", "unit": "f"}),
        ("get_time", {"tz": "UTC"}),
        ("ping", {}),
        ("forecast", {"where": {"city": "Oslo", "unit": "c"}, "days": 3}),
    ]


OLD_STYLE = {  # draft-07 "definitions", as pydantic v1 and zod-to-json-schema write them
    "type": "function",
    "function": {
        "name": "old",
        "parameters": {
            "type": "object",
            "definitions": {"U": {"enum": ["a", "b"]}},
            "properties": {"u": {"$ref": "#/definitions/U"}},
            "required": ["u"],
        },
    },
}
RECURSIVE = {  # "#" is the parameters' own root
    "type": "function",
    "function": {
        "name": "tree",
        "parameters": {
            "type": "object",
            "properties": {
                "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
                "v": {"type": "integer"},
            },
            "required": ["v"],
        },
    },
}


@pytest.mark.parametrize(
    ("tool", "good", "bad"),
    [
        (OLD_STYLE, block("old", {"u": "a"}), block("old", {"u": "c"})),
        (
            RECURSIVE,
            block("tree", {"next": {"next": None, "v": 2}, "v": 1}),
            block("tree", {"next": {"name": "tree", "arguments": {"v": 2}}, "v": 1}),
        ),
    ],
    ids=["definitions", "root"],
)
def test_other_local_refs_work_too(lltok, tool, good, bad):
    spec = valid_spec(plan(tools=[tool], tool_choice="required"))
    assert lark_takes(lltok, spec, good)
    assert not lark_takes(lltok, spec, bad)


# ---- template_has_tools ----------------------------------------------------------------------


def test_template_has_tools():
    assert template_has_tools("{% for t in tools %}{{ t }}{% endfor %}")
    assert not template_has_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_has_tools("")
    assert not template_has_tools(None)


# ---- tool_conversation -----------------------------------------------------------------------


def conv_of(*messages) -> list[dict]:
    return [p.ChatMessage.model_validate(m).template_dict() for m in messages]


HISTORY = (
    {"role": "user", "content": "Weather in Paris and the time in UTC?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
)


def test_system_prompt_is_added():
    out = tool_conversation(conv_of({"role": "user", "content": "hi"}), AUTO)
    assert [m["role"] for m in out] == ["system", "user"]
    system = out[0]["content"]
    assert "<tools>" in system and "<tool_call>" in system
    lines = system.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].splitlines()
    assert [json.loads(x) for x in lines] == [
        p.ToolDef.model_validate(t).model_dump(exclude_none=True) for t in TOOLS
    ]
    assert out[1] == {"role": "user", "content": "hi"}


def test_system_prompt_is_appended_to_the_system_message():
    conv = conv_of({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"})
    out = tool_conversation(conv, AUTO)
    assert [m["role"] for m in out] == ["system", "user"]
    system = out[0]["content"]
    assert system.startswith("Be brief.\n\n") and "<tools>" in system
    assert '"name": "get_weather"' in system
    assert conv[0]["content"] == "Be brief."  # the input is not changed


def test_earlier_calls_and_answers_in_tags():
    out = tool_conversation(conv_of(*HISTORY), None)
    assert [m["role"] for m in out] == ["user", "assistant", "user", "user"]  # no system prompt
    assistant = out[1]
    assert "tool_calls" not in assistant
    content, calls = parse_tool_calls(assistant["content"], AUTO)
    assert content is None
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]
    assert assistant["content"].count(OPEN_TAG) == 2
    assert out[2] == {"role": "user", "content": "<tool_response>\n18 C\n</tool_response>"}
    assert out[3] == {"role": "user", "content": "<tool_response>\n12:00\n</tool_response>"}


def test_assistant_text_before_its_calls_is_kept():
    msg = {**HISTORY[1], "content": "Let me look."}
    out = tool_conversation(conv_of(HISTORY[0], msg), AUTO)
    assistant = out[2]["content"]
    assert assistant.startswith("Let me look.\n<tool_call>\n")
    content, calls = parse_tool_calls(assistant, AUTO)
    assert content == "Let me look." and len(calls) == 2


# ---- parse_tool_calls ------------------------------------------------------------------------


def test_one_call():
    content, calls = parse_tool_calls(block("get_weather", {"city": "Paris"}, False), AUTO)
    assert content is None
    assert calls_of(calls) == [("get_weather", {"city": "Paris"})]
    assert calls[0].type == "function" and calls[0].id.startswith("call_")


def test_two_calls():
    text = block("get_weather", {"city": "Paris"}) + "\n" + block("get_time", {"tz": "UTC"})
    content, calls = parse_tool_calls(text, AUTO)
    assert content is None
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]
    assert calls[0].id != calls[1].id


def test_text_around_the_calls_is_content():
    text = "Let me check.\n" + block("get_time", {"tz": "UTC"}) + "\nOne moment."
    content, calls = parse_tool_calls(text, AUTO)
    assert calls_of(calls) == [("get_time", {"tz": "UTC"})]
    assert content == "Let me check.\n\nOne moment."


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": \n</tool_call>',
        block("get_wether", {"city": "Paris"}),
        '<tool_call>\n["get_time", {"tz": "UTC"}]\n</tool_call>',
        '<tool_call>\n{"name": "get_time", "arguments": "not json"}\n</tool_call>',
        '<tool_call>\n{"name": "get_time", "arguments": [1, 2]}\n</tool_call>',
        "Just text, no <tool_call here.",
        "",
    ],
)
def test_not_a_call_stays_in_the_content(text):
    assert parse_tool_calls("Hmm. " + text, AUTO) == ("Hmm. " + text, [])


def test_bad_block_next_to_a_good_one_stays_in_the_content():
    bad = block("get_wether", {"city": "Paris"})
    text = bad + "\n" + block("get_time", {"tz": "UTC"})
    content, calls = parse_tool_calls(text, AUTO)
    assert calls_of(calls) == [("get_time", {"tz": "UTC"})]
    assert content == bad


def test_arguments_as_json_text():
    body = {"name": "get_weather", "arguments": json.dumps({"city": "Zürich"})}
    content, calls = parse_tool_calls(f"<tool_call>\n{json.dumps(body)}\n</tool_call>", AUTO)
    assert content is None and calls_of(calls) == [("get_weather", {"city": "Zürich"})]
    assert "Zürich" in calls[0].function.arguments  # not \u-escaped


def test_parameters_alias_and_missing_arguments():
    text = '<tool_call>\n{"name": "get_time", "parameters": {"tz": "CET"}}\n</tool_call>'
    assert calls_of(parse_tool_calls(text, AUTO)[1]) == [("get_time", {"tz": "CET"})]
    text = '<tool_call>\n{"name": "ping"}\n</tool_call>'
    assert calls_of(parse_tool_calls(text, AUTO)[1]) == [("ping", {})]


def test_unterminated_final_block():
    text = (
        block("get_weather", {"city": "Paris"}) + '\n<tool_call>\n{"name": "ping", "arguments": {}}'
    )
    content, calls = parse_tool_calls(text, AUTO)
    assert content is None
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("ping", {})]


def test_only_the_plans_tools_are_calls():
    only_time = plan(tools=[TIME])
    text = block("get_weather", {"city": "Paris"})
    assert parse_tool_calls(text, only_time) == (text, [])


# ---- ToolCallStream --------------------------------------------------------------------------


def test_plain_text_streams_through():
    s = ToolCallStream(AUTO)
    assert s.feed("Hello") == "Hello"
    assert s.feed(", world <3 <") == ", world <3 "  # only a trailing "<" could begin a tag
    assert s.feed("3 and 1 < 2.") == "<3 and 1 < 2."
    assert s.finish("stop") == ("", [], "stop")


def test_partial_tag_is_held_then_released():
    s = ToolCallStream(AUTO)
    assert s.feed("See <tool_") == "See "
    assert s.feed("box>!") == "<tool_box>!"
    assert s.feed("<tool_ca") == ""
    assert s.finish("stop") == ("<tool_ca", [], "stop")


def test_a_call_is_held_and_returned_at_the_end():
    s = ToolCallStream(AUTO)
    assert s.feed("Sure. <tool_ca") == "Sure. "
    assert s.feed('ll>\n{"name": "get_time", ') == ""
    assert s.feed('"arguments": {"tz": "UTC"}}\n</tool_call>') == ""
    assert s.feed("\nDone.") == ""
    held, calls, finish = s.finish("stop")
    assert (held, calls_of(calls), finish) == ("Done.", [("get_time", {"tz": "UTC"})], "tool_calls")


def test_held_text_that_is_no_call_comes_back():
    s = ToolCallStream(AUTO)
    assert s.feed("Use the <tool_call> tag.") == "Use the "
    assert s.finish("stop") == ("<tool_call> tag.", [], "stop")


@pytest.mark.parametrize("reason", ["length", "abort", None])
def test_unfinished_choice_returns_the_held_text(reason):
    text = block("get_time", {"tz": "UTC"})
    s = ToolCallStream(AUTO)
    assert s.feed("A " + text) == "A "
    assert s.finish(reason) == (text, [], reason)


def test_forced_mode_holds_everything():
    s = ToolCallStream(plan(tool_choice="required"))
    text = block("get_weather", {"city": "Paris"}) + "\n" + block("get_time", {"tz": "UTC"})
    for i in range(0, len(text), 7):
        assert s.feed(text[i : i + 7]) == ""
    held, calls, finish = s.finish("stop")
    assert held == "" and finish == "tool_calls"
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]

    s = ToolCallStream(plan(tool_choice=named("get_time")))
    assert s.feed("no tags here") == ""
    assert s.finish("stop") == ("no tags here", [], "stop")


def test_forced_choice_cut_by_length_keeps_its_complete_calls():
    t = plan(tool_choice="required")
    done = block("get_weather", {"city": "Paris"}) + "\n" + block("get_time", {"tz": "UTC"})
    cut = '\n<tool_call>\n{"name":"get_time","argum'
    s = ToolCallStream(t)
    assert s.feed(done + cut) == ""
    held, calls, finish = s.finish("length")
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]
    assert finish == "length" and held == cut.strip()
    s = ToolCallStream(t)
    assert s.feed(cut) == ""
    assert s.finish("length") == (cut, [], "length")
    s = ToolCallStream(t)
    assert s.feed(done) == ""
    assert s.finish("abort") == (done, [], "abort")


def stream(t, pieces: list[str], reason: str = "stop"):
    s = ToolCallStream(t)
    out = [s.feed(x) for x in pieces]
    streamed = "".join(out)
    held, calls, finish = s.finish(reason)
    return streamed, held, calls_of(calls), finish


def test_char_by_char_is_the_same_as_whole():
    text = (
        "I will call <tool_ things. <"
        + block("get_weather", {"city": "Paris"}, False)
        + "\n"
        + block("ping", {})
        + "\nok"
    )
    whole = stream(AUTO, [text])
    assert whole[0] == "I will call <tool_ things. <"
    assert whole[2] == [("get_weather", {"city": "Paris"}), ("ping", {})]
    assert whole[3] == "tool_calls"
    assert stream(AUTO, list(text)) == whole


FRAGMENTS = st.sampled_from(
    [
        "Hi",
        " ",
        "\n",
        "<",
        "<tool",
        "<tool_",
        "<tool_call",
        "_call>",
        "</tool_call>",
        "<tool_response>",
        "{",
        "é🦜",
        block("get_weather", {"city": "Paris"}),
        block("get_time", {"tz": "UTC"}, False),
        block("nope", {}),
        '<tool_call>\n{"name": "ping"',
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(FRAGMENTS, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    forced=st.booleans(),
    reason=st.sampled_from(["stop", "length"]),
)
def test_any_split_gives_what_the_whole_gives(parts, cuts, forced, reason):
    text = "".join(parts)
    t = plan(tool_choice="required") if forced else AUTO
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    split = stream(t, pieces, reason)
    assert split == stream(t, [text], reason)
    streamed, held, calls, finish = split
    if forced:
        assert streamed == ""
    else:
        assert OPEN_TAG not in streamed
        assert text.startswith(streamed)
    if calls:
        assert reason == "stop" or forced  # auto parses only a finished choice
        assert finish == ("tool_calls" if reason == "stop" else reason)
        assert calls == calls_of(parse_tool_calls(text, t)[1])
    else:  # nothing lost: every character comes back as content
        assert streamed + held == text and finish == reason


def test_an_unterminated_block_does_not_swallow_the_next_call():
    text = '<tool_call>\n{"name": "get_weather", "argu\n' + block("get_time", {"city": "Oslo"})
    content, calls = parse_tool_calls(text, AUTO)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_time", {"city": "Oslo"})
    ]
    assert content.startswith("<tool_call>")


def test_without_parallel_calls_only_the_first_call_is_taken():
    text = block("get_weather", {"city": "Oslo"}) + "\n" + block("get_time", {"city": "Rome"})
    one = plan(parallel_tool_calls=False)
    content, calls = parse_tool_calls(text, one)
    assert [c.function.name for c in calls] == ["get_weather"]
    assert content == block("get_time", {"city": "Rome"})
    _, both = parse_tool_calls(text, plan())
    assert [c.function.name for c in both] == ["get_weather", "get_time"]
