"""A request's structured-output fields as one constraint for the workers.

OpenAI's `response_format` (json_object, json_schema), vLLM's `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar` (a Lark grammar, llguidance's dialect) and its newer
`structured_outputs` object: at most one of them per request. The router builds the constraint
as text and never compiles it: the workers' grammar library does, and refuses what it cannot
honour (a 400 naming the field, see Handlers).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from baton.scheduler.sampling_params import SamplingParams
from baton.server.api import protocol as p


@dataclass(frozen=True)
class Constraint:
    kind: str  # "json", "regex" or "lark" (SamplingParams.guided)
    spec: str
    compact: bool  # JSON without optional whitespace
    field: str  # the request field it came from, named by every error about it


class InvalidConstraint(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def choice_grammar(choices: list[str]) -> str:
    """A Lark grammar matching exactly one of `choices` (JSON string escapes are Lark's)."""
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def _schema_text(field: str, schema) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidConstraint(field, f"not JSON: {e}") from None
    if not isinstance(schema, dict | bool):
        raise InvalidConstraint(field, "a JSON schema must be an object or a boolean")
    return json.dumps(schema)


def _from_response_format(rf: p.ResponseFormat) -> Constraint | None:
    field = "response_format"
    if rf.type == "text":
        return None
    if rf.type == "json_object":
        return Constraint("json", '{"type": "object"}', False, field)
    if rf.type == "json_schema":
        js = rf.json_schema
        if js is None or js.schema_ is None:
            raise InvalidConstraint(field, "json_schema.schema is required for type json_schema")
        return Constraint("json", _schema_text(field, js.schema_), False, field)
    raise InvalidConstraint(
        field, f"type {rf.type!r} is not supported (text, json_object, json_schema)"
    )


def _from_structured_outputs(so: p.StructuredOutputs) -> Constraint | None:
    field = "structured_outputs"
    compact = bool(so.disable_any_whitespace)
    given = {
        k: v
        for k, v in (
            ("json", so.json_),
            ("regex", so.regex),
            ("choice", so.choice),
            ("grammar", so.grammar),
            ("json_object", so.json_object or None),
        )
        if v is not None
    }
    if len(given) > 1:
        raise InvalidConstraint(
            field, f"give one of json, regex, choice, grammar; got {sorted(given)}"
        )
    if not given:
        return None
    ((kind, value),) = given.items()
    return _constraint(f"{field}.{kind}", kind, value, compact)


def _constraint(field: str, kind: str, value, compact: bool) -> Constraint:
    if kind == "json":
        return Constraint("json", _schema_text(field, value), compact, field)
    if kind == "json_object":
        return Constraint("json", '{"type": "object"}', compact, field)
    if not value:
        raise InvalidConstraint(field, "must not be empty")
    if kind == "regex":
        return Constraint("regex", value, compact, field)
    if kind == "choice":
        if any(not isinstance(c, str) or not c for c in value):
            raise InvalidConstraint(field, "choices must be non-empty strings")
        return Constraint("lark", choice_grammar(value), compact, field)
    return Constraint("lark", value, compact, field)  # grammar


def constraint_of(req: p.CompletionRequest | p.ChatCompletionRequest) -> Constraint | None:
    """The request's one constraint, or None; InvalidConstraint naming the field otherwise."""
    found: list[Constraint] = []
    names: list[str] = []
    # NOTE: a source that asks for nothing (response_format text, an empty structured_outputs)
    # is no constraint, so it combines with any other: some clients always send one.
    if req.response_format is not None:
        c = _from_response_format(req.response_format)
        names += ["response_format"] if c else []
        found += [c] if c else []
    for field, kind, value in (
        ("guided_json", "json", req.guided_json),
        ("guided_regex", "regex", req.guided_regex),
        ("guided_choice", "choice", req.guided_choice),
        ("guided_grammar", "grammar", req.guided_grammar),
    ):
        if value is not None:
            names.append(field)
            found.append(_constraint(field, kind, value, False))
    if req.structured_outputs is not None:
        c = _from_structured_outputs(req.structured_outputs)
        names += ["structured_outputs"] if c else []
        found += [c] if c else []
    if len(names) > 1:
        raise InvalidConstraint(names[1], f"cannot be combined with {names[0]}")
    return found[0] if found else None


def with_constraint(params: SamplingParams, c: Constraint | None) -> SamplingParams:
    """`params` constrained by `c` (the field is kept, locally, for a worker's refusal)."""
    if c is None:
        return params
    try:
        return dataclasses.replace(
            params,
            guided=c.kind,
            guided_spec=c.spec,
            guided_compact=c.compact,
            extra={**params.extra, "guided_field": c.field},
        )
    except ValueError as e:  # too long for the wire
        raise InvalidConstraint(c.field, str(e).split(": ", 1)[-1]) from None
