"""Logprob entries as msgpack-native lists, the way TokenOutput and KVDone carry them."""

from __future__ import annotations


def logprob_to_wire(entry) -> list:
    """(token, logprob, [(token, logprob), ...]) as msgpack-native lists."""
    token, logprob, top = entry
    return [token, logprob, [list(x) for x in top]]


def logprob_from_wire(entry) -> tuple:
    token, logprob, top = entry
    return (token, logprob, [tuple(x) for x in top])
