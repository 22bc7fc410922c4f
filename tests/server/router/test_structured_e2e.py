"""Structured outputs and tool calls through a live `baton serve`, in both modes, with clients
no one here wrote: the official `openai` client and LangChain's ChatOpenAI."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from baton import SamplingParams
from tests.server.guided.schemas import PROMPTS, SCHEMAS

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(params=["disagg", "colocated"])
def server(request):
    return request.getfixturevalue(request.param)


def schema_format(name: str) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True},
    }


def test_a_dozen_schemas_every_finished_output_validates(disagg):
    # NOTE: disaggregated only (the grammar state crosses the handoff); colocated serving
    # gives the same constrained tokens (the test below), so a second dozen would prove nothing.
    c = disagg.client()

    def ask(name):
        r = c.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": PROMPTS[name]}],
            max_tokens=80,
            temperature=0,
            response_format=schema_format(name),
        )
        return name, r.choices[0]

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        results = list(pool.map(ask, SCHEMAS))
    finished = [(n, ch) for n, ch in results if ch.finish_reason == "stop"]
    for name, ch in finished:
        jsonschema.validate(json.loads(ch.message.content), SCHEMAS[name])
    assert all(ch.finish_reason in ("stop", "length") for _, ch in results)
    assert len(finished) >= 9, [(n, ch.message.content) for n, ch in results]


def test_constrained_tokens_are_the_same_disaggregated_colocated_and_offline(
    disagg, colocated, smollm2
):
    ids = smollm2.apply_chat_template([{"role": "user", "content": PROMPTS["items"]}])
    spec = json.dumps(SCHEMAS["items"])
    want = (
        smollm2.generate(
            [ids], SamplingParams(max_tokens=60, temperature=0, guided="json", guided_spec=spec)
        )[0]
        .outputs[0]
        .text
    )

    def served(s) -> str:
        r = s.client().completions.create(
            model="smollm2",
            prompt=ids,
            max_tokens=60,
            temperature=0,
            extra_body={"guided_json": SCHEMAS["items"]},
        )
        return r.choices[0].text

    with ThreadPoolExecutor(2) as pool:  # two servers, side by side
        assert list(pool.map(served, (disagg, colocated))) == [want, want]


class Book(BaseModel):
    title: str = Field(max_length=40)
    year: int = Field(ge=1000, le=2100)


def test_openai_parse_with_a_pydantic_model(server):
    r = server.client().chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a famous book and its year."}],
        max_tokens=60,
        temperature=0,
        response_format=Book,
    )
    book = r.choices[0].message.parsed
    assert isinstance(book, Book) and 1000 <= book.year <= 2100


def test_regex_choice_and_json_object(server):
    c = server.client()
    r = c.completions.create(
        model="smollm2",
        prompt="Call me at",
        max_tokens=20,
        temperature=1.0,
        seed=5,
        extra_body={"guided_regex": r"\(\d{3}\) \d{3}-\d{4}"},
    )
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", r.choices[0].text)
    r = c.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Is water wet?"}],
        max_tokens=5,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert r.choices[0].message.content in ("yes", "no")
    r = c.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Describe a cat in JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
        extra_body={"structured_outputs": None},
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def calls_of(message) -> list[tuple[str, dict]]:
    return [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls or []]


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_forced_tool_calls_validate_and_stream_into_the_same_call(disagg, choice):
    # NOTE: disaggregated only, as the dozen schemas above: a tool call is a JSON grammar
    c = disagg.client()
    kw = {"model": "smollm2", "messages": ASK, "max_tokens": 80, "temperature": 0}
    kw |= {"tools": [WEATHER, TIME], "tool_choice": choice, "parallel_tool_calls": False}
    r = c.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and not ch.message.content
    ((name, args),) = calls_of(ch.message)
    if isinstance(choice, dict):
        assert name == "get_time"
    tool = {"get_weather": WEATHER, "get_time": TIME}[name]
    jsonschema.validate(args, tool["function"]["parameters"])
    assert re.fullmatch(r"call_\w+", ch.message.tool_calls[0].id)

    calls, finish = {}, None
    for chunk in c.chat.completions.create(**kw, stream=True):
        for d in chunk.choices:
            for tc in d.delta.tool_calls or []:
                e = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                e["id"] += tc.id or ""
                e["name"] += tc.function.name or ""
                e["arguments"] += tc.function.arguments or ""
            finish = d.finish_reason or finish
    assert finish == "tool_calls"
    assert [(e["name"], json.loads(e["arguments"])) for e in calls.values()] == [(name, args)]
    assert calls[0]["id"].startswith("call_")


def test_a_tool_round_trip_is_accepted(server):
    c = server.client()
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    msgs = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    r = c.chat.completions.create(
        model="smollm2", messages=msgs, tools=[WEATHER], max_tokens=20, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_what_a_worker_refuses_is_a_400_naming_the_field(server):
    c = server.client()
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            r = c.chat.completions.create(
                model="smollm2", messages=ASK, max_tokens=5, response_format=bad, stream=stream
            )
            list(r) if stream else None
        assert e.value.body["param"] == "response_format"
        assert "strin" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(
            model="smollm2", prompt="x", max_tokens=5, extra_body={"guided_regex": "[a-z"}
        )
    assert e.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="smollm2", messages=ASK, max_tokens=5, response_format={"type": "xml"}
        )
    assert e.value.body["param"] == "response_format"
    huge = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "description": "x" * 200} for i in range(1000)},
    }
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="smollm2", messages=ASK, max_tokens=5, extra_body={"guided_json": huge}
        )
    assert e.value.body["param"] == "guided_json" and "bytes exceed" in e.value.body["message"]
    r = c.chat.completions.create(model="smollm2", messages=ASK, max_tokens=3)  # still serving
    assert r.choices[0].message.content is not None


def test_langchain_structured_output_and_bound_tools(disagg):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="smollm2", base_url=disagg.url + "/v1", api_key="x", temperature=0, max_tokens=60
    )
    book = llm.with_structured_output(Book, method="json_schema").invoke(
        "Name a famous book and its year."
    )
    assert isinstance(book, Book)
    bound = llm.bind_tools([WEATHER], tool_choice="get_weather")
    msg = bound.invoke("What is the weather in Paris?")
    assert msg.tool_calls  # parallel calls allowed: one or more, each valid
    for call in msg.tool_calls:
        assert call["name"] == "get_weather"
        jsonschema.validate(call["args"], WEATHER["function"]["parameters"])
