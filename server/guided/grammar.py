"""A constraint (kind, spec) as an llguidance grammar, and the check that refuses a bad one."""

from __future__ import annotations

import json


def grammar_for(kind: str, spec: str, compact: bool = False) -> str:
    """The llguidance grammar of a constraint; ValueError naming `guided_spec` if it is not one.

    kind: "json" (a JSON schema, as text), "regex" or "lark" (llguidance's Lark dialect, which
    takes `%json {...}` for a JSON-schema rule). `compact`: JSON with no optional whitespace."""
    from llguidance import LLMatcher

    if kind == "json":
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"guided_spec: not JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise ValueError("guided_spec: a JSON schema must be an object or a boolean")
        try:
            return LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": not compact}
            )
        except ValueError as e:
            raise ValueError(f"guided_spec: {e}") from None
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    if kind == "lark":
        return LLMatcher.grammar_from_lark(spec)
    raise ValueError(f"guided: unknown kind {kind!r}")


def check_grammar(grammar: str, tokenizer=None) -> None:
    """ValueError naming `guided_spec` with the library's reason, if it refuses `grammar`."""
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(grammar, tokenizer)
    if error and not error.startswith("WARNING"):
        raise ValueError(f"guided_spec: {error.strip()}")
