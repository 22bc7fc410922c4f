"""Structured-output fields: each form becomes one Constraint; bad ones name their field."""

from __future__ import annotations

import json

import llguidance
import pytest

from baton.scheduler.sampling_params import MAX_GUIDED_SPEC_BYTES, SamplingParams
from baton.server.api import protocol as p
from baton.server.api.structured import (
    Constraint,
    InvalidConstraint,
    choice_grammar,
    constraint_of,
    with_constraint,
)
from baton.server.guided.grammar import check_grammar, grammar_for
from tests.server.guided.lark import lark_takes

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["city"],
}


def chat(**fields) -> p.ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return p.ChatCompletionRequest.model_validate(body)


def completion(**fields) -> p.CompletionRequest:
    return p.CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def invalid(req) -> InvalidConstraint:
    with pytest.raises(InvalidConstraint) as e:
        constraint_of(req)
    return e.value


# ---- no constraint ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"response_format": {"type": "text"}},
        {"structured_outputs": {}},
        {"structured_outputs": {"json_object": False}},
        {"structured_outputs": {"disable_any_whitespace": True}},
    ],
)
def test_no_constraint(fields):
    assert constraint_of(chat(**fields)) is None
    assert constraint_of(completion(**fields)) is None


# ---- each form -------------------------------------------------------------------------------


def test_json_object_is_any_object():
    c = constraint_of(chat(response_format={"type": "json_object"}))
    assert (c.kind, json.loads(c.spec), c.compact, c.field) == (
        "json",
        {"type": "object"},
        False,
        "response_format",
    )


def test_json_schema_with_a_schema_object():
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}
    c = constraint_of(chat(response_format=rf))
    assert (c.kind, c.field, c.compact) == ("json", "response_format", False)
    assert json.loads(c.spec) == SCHEMA


@pytest.mark.parametrize("schema", [True, False])
def test_json_schema_with_a_boolean_schema(schema):
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    c = constraint_of(chat(response_format=rf))
    assert (c.kind, c.field) == ("json", "response_format")
    assert json.loads(c.spec) is schema


def test_guided_json_as_object_and_as_text_agree():
    as_dict = constraint_of(chat(guided_json=SCHEMA))
    as_text = constraint_of(chat(guided_json=json.dumps(SCHEMA)))
    for c in (as_dict, as_text):
        assert (c.kind, c.field, c.compact) == ("json", "guided_json", False)
        assert json.loads(c.spec) == SCHEMA
    assert json.loads(constraint_of(chat(guided_json=True)).spec) is True


def test_guided_regex_and_grammar_pass_through():
    c = constraint_of(completion(guided_regex=r"\d{3}-[a-z]+"))
    assert (c.kind, c.spec, c.field) == ("regex", r"\d{3}-[a-z]+", "guided_regex")
    g = 'start: "yes" | "no"'
    c = constraint_of(chat(guided_grammar=g))
    assert (c.kind, c.spec, c.field) == ("lark", g, "guided_grammar")


def test_guided_choice_is_a_lark_grammar():
    c = constraint_of(chat(guided_choice=["yes", "no"]))
    assert (c.kind, c.field, c.compact) == ("lark", "guided_choice", False)
    assert c.spec == choice_grammar(["yes", "no"])
    grammar = llguidance.LLMatcher.grammar_from_lark(c.spec)
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""


CHOICES = ["yes", "no", "ab", "a", 'say "hi"', "back\\slash", "two\nlines", "café 🦜", "%json"]


def test_choice_grammar_matches_exactly_the_choices(lltok):
    spec = choice_grammar(CHOICES)
    assert llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(spec)) == ""
    for choice in CHOICES:
        assert lark_takes(lltok, spec, choice), choice
    for other in [
        "",
        "x",
        "y",
        "n",
        "yes!",
        "Yes",
        "abc",
        "no ",
        'say "hi',
        "back\\\\slash",
        "café",
    ]:
        assert not lark_takes(lltok, spec, other), other


@pytest.mark.parametrize(
    ("so", "kind", "field"),
    [
        ({"json": SCHEMA}, "json", "structured_outputs.json"),
        ({"json": json.dumps(SCHEMA)}, "json", "structured_outputs.json"),
        ({"regex": "[0-9]+"}, "regex", "structured_outputs.regex"),
        ({"choice": ["x", "y"]}, "lark", "structured_outputs.choice"),
        ({"grammar": 'start: "z"'}, "lark", "structured_outputs.grammar"),
        ({"json_object": True}, "json", "structured_outputs.json_object"),
    ],
)
@pytest.mark.parametrize("compact", [False, True])
def test_structured_outputs(so, kind, field, compact):
    body = {**so, "disable_any_whitespace": True} if compact else so
    c = constraint_of(chat(structured_outputs=body))
    assert (c.kind, c.field, c.compact) == (kind, field, compact)
    expected = {
        "structured_outputs.json": lambda s: json.loads(s) == SCHEMA,
        "structured_outputs.regex": lambda s: s == "[0-9]+",
        "structured_outputs.choice": lambda s: s == choice_grammar(["x", "y"]),
        "structured_outputs.grammar": lambda s: s == 'start: "z"',
        "structured_outputs.json_object": lambda s: json.loads(s) == {"type": "object"},
    }[field]
    assert expected(c.spec), c.spec
    # and the workers can compile what the router built
    check_grammar(grammar_for(c.kind, c.spec, c.compact))


# ---- errors name the field -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["xml", "json", "JSON_OBJECT", ""])
def test_unknown_response_format_type(kind):
    e = invalid(chat(response_format={"type": kind}))
    assert e.field == "response_format"
    assert repr(kind) in str(e) and str(e).startswith("response_format: ")


@pytest.mark.parametrize(
    "rf", [{"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "x"}}]
)
def test_json_schema_without_a_schema(rf):
    e = invalid(chat(response_format=rf))
    assert e.field == "response_format" and "json_schema.schema is required" in str(e)


@pytest.mark.parametrize(
    ("fields", "second", "first"),
    [
        (
            {"response_format": {"type": "json_object"}, "guided_json": SCHEMA},
            "guided_json",
            "response_format",
        ),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "guided_regex"),
        ({"guided_json": SCHEMA, "guided_grammar": 'start: "a"'}, "guided_grammar", "guided_json"),
        (
            {"guided_choice": ["a"], "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "guided_choice",
        ),
        (
            {
                "response_format": {"type": "json_object"},
                "structured_outputs": {"json_object": True},
            },
            "structured_outputs",
            "response_format",
        ),
    ],
)
def test_two_sources_name_the_second(fields, second, first):
    for req in (chat(**fields), completion(**fields)):
        e = invalid(req)
        assert e.field == second
        assert str(e).startswith(f"{second}: ") and first in str(e)


@pytest.mark.parametrize(
    "so",
    [
        {"json": SCHEMA, "regex": "a"},
        {"choice": ["a"], "grammar": 'start: "a"'},
        {"json_object": True, "regex": "a"},
    ],
)
def test_structured_outputs_with_two_members(so):
    e = invalid(chat(structured_outputs=so))
    assert e.field == "structured_outputs"
    for member in so:
        assert member in str(e)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"guided_regex": ""}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_grammar": ""}, "guided_grammar"),
        ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ],
)
def test_empty_constraint(fields, field):
    e = invalid(chat(**fields))
    assert e.field == field and "empty" in str(e)


@pytest.mark.parametrize("choices", [["a", ""], [""]])
def test_empty_choice_string(choices):
    e = invalid(chat(guided_choice=choices))
    assert e.field == "guided_choice" and "non-empty" in str(e)


@pytest.mark.parametrize(
    ("fields", "field", "why"),
    [
        ({"guided_json": "{not json"}, "guided_json", "not JSON"),
        ({"guided_json": ""}, "guided_json", "not JSON"),
        ({"structured_outputs": {"json": "nope"}}, "structured_outputs.json", "not JSON"),
        ({"guided_json": "[1, 2]"}, "guided_json", "object or a boolean"),
        ({"guided_json": '"text"'}, "guided_json", "object or a boolean"),
    ],
)
def test_schema_that_is_not_a_json_schema(fields, field, why):
    e = invalid(chat(**fields))
    assert e.field == field and why in str(e)


# ---- into SamplingParams ---------------------------------------------------------------------


def test_with_constraint_sets_the_guided_fields():
    params = SamplingParams(temperature=0.5, max_tokens=7, extra={"keep": 1})
    c = Constraint("regex", "[a-z]+", True, "structured_outputs.regex")
    out = with_constraint(params, c)
    assert (out.guided, out.guided_spec, out.guided_compact) == ("regex", "[a-z]+", True)
    assert out.extra == {"keep": 1, "guided_field": "structured_outputs.regex"}
    assert (out.temperature, out.max_tokens) == (0.5, 7)
    assert params.extra == {"keep": 1} and params.guided == ""  # the original is untouched


def test_with_no_constraint_keeps_the_params():
    params = SamplingParams(temperature=0.5)
    assert with_constraint(params, None) is params


def test_request_to_params_end_to_end():
    req = chat(guided_choice=["a", "b"], temperature=0.0)
    out = with_constraint(req.sampling_params(), constraint_of(req))
    assert (out.guided, out.guided_spec) == ("lark", choice_grammar(["a", "b"]))
    assert out.extra["guided_field"] == "guided_choice" and out.temperature == 0.0


def test_spec_at_the_limit_is_allowed():
    c = constraint_of(chat(guided_regex="a" * MAX_GUIDED_SPEC_BYTES))
    assert len(with_constraint(SamplingParams(), c).guided_spec) == MAX_GUIDED_SPEC_BYTES


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"guided_regex": "a" * (MAX_GUIDED_SPEC_BYTES + 1)}, "guided_regex"),
        # fewer characters than the limit, more UTF-8 bytes
        ({"guided_grammar": "é" * (MAX_GUIDED_SPEC_BYTES // 2 + 1)}, "guided_grammar"),
        ({"guided_choice": ["x" * MAX_GUIDED_SPEC_BYTES]}, "guided_choice"),
        (
            {"structured_outputs": {"regex": "b" * (MAX_GUIDED_SPEC_BYTES + 1)}},
            "structured_outputs.regex",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"description": "d" * MAX_GUIDED_SPEC_BYTES}},
                }
            },
            "response_format",
        ),
    ],
)
def test_spec_over_the_limit_names_the_field(fields, field):
    req = chat(**fields)
    c = constraint_of(req)
    with pytest.raises(InvalidConstraint) as e:
        with_constraint(req.sampling_params(), c)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ") and str(MAX_GUIDED_SPEC_BYTES) in str(e.value)
    assert "guided_spec" not in str(e.value)  # the wire's name is not the client's


def test_a_source_that_asks_for_nothing_combines_with_one_that_does():
    req = p.ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "text"},
            "structured_outputs": {"disable_any_whitespace": True},
            "guided_regex": "[a-z]+",
        }
    )
    c = constraint_of(req)
    assert (c.kind, c.spec, c.field) == ("regex", "[a-z]+", "guided_regex")
