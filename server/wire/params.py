"""SamplingParams on the wire: a msgpack-native map, checked field by field on the way in."""

from __future__ import annotations

import dataclasses

from baton.scheduler.sampling_params import SamplingParams

# NOTE: `extra` stays behind: it is a free-form local dict, not part of the request's meaning.
_PARAM_FIELDS = {f.name: f for f in dataclasses.fields(SamplingParams) if f.name != "extra"}
_PARAM_TUPLES = ("stop", "stop_token_ids")
_PARAM_BOOLS = tuple(name for name, f in _PARAM_FIELDS.items() if f.type in (bool, "bool"))


def params_to_dict(params: SamplingParams) -> dict:
    """msgpack-native map of every field but `extra`; tuples become lists."""
    d = {name: getattr(params, name) for name in _PARAM_FIELDS}
    for name in _PARAM_TUPLES:
        d[name] = list(d[name])
    return d


def params_from_dict(d: dict) -> SamplingParams:
    """SamplingParams from the wire; ValueError (naming the field) on anything off."""
    if not isinstance(d, dict):
        raise ValueError(f"params: must be a map, got {type(d).__name__}")
    unknown = [k for k in d if k not in _PARAM_FIELDS]
    if unknown:
        raise ValueError(f"params: unknown fields {sorted(map(repr, unknown))}")
    for name in _PARAM_TUPLES:
        if name in d and not isinstance(d[name], list):
            raise ValueError(f"{name}: must be a list, got {type(d[name]).__name__}")
    for name in _PARAM_BOOLS:  # SamplingParams checks numbers itself, not its flags
        if name in d and not isinstance(d[name], bool):
            raise ValueError(f"{name}: must be a bool, got {d[name]!r}")
    try:
        return SamplingParams(**d)
    except TypeError as e:  # a value SamplingParams cannot even compare
        raise ValueError(f"params: {e}") from None
