"""Checking a Lark grammar against text with llguidance."""

from __future__ import annotations

import llguidance


def lark_takes(tok, lark: str, text: str) -> bool:
    """Whether the grammar takes every token of `text` and may end there."""
    m = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
    assert not m.is_error(), m.get_error()
    ok = all(m.consume_token(t) for t in tok.tokenize_str(text))
    return ok and not m.is_error() and m.is_accepting()
