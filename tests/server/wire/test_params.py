"""SamplingParams crosses the wire unchanged or not at all."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.scheduler.sampling_params import SamplingParams
from baton.server.wire.params import params_from_dict, params_to_dict

FULL = SamplingParams(
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    min_p=0.05,
    seed=1234,
    max_tokens=64,
    min_tokens=2,
    stop=["\n\n", "END"],
    stop_token_ids=[2, 7],
    ignore_eos=True,
    presence_penalty=0.5,
    frequency_penalty=-0.5,
    repetition_penalty=1.2,
    logprobs=5,
    skip_special_tokens=False,
    include_stop_str_in_output=True,
)


@pytest.mark.parametrize("params", [SamplingParams(), FULL], ids=["default", "full"])
def test_params_round_trip_through_msgpack(params):
    d = params_to_dict(params)
    assert isinstance(d["stop"], list) and isinstance(d["stop_token_ids"], list)
    assert "extra" not in d
    wire = msgpack.unpackb(msgpack.packb(d))
    assert wire == d
    back = params_from_dict(wire)
    assert back == params
    assert back.stop == params.stop and back.stop_token_ids == params.stop_token_ids


def test_params_dict_names_every_field_but_extra():
    names = {f.name for f in dataclasses.fields(SamplingParams)} - {"extra"}
    assert set(params_to_dict(FULL)) == names


def test_params_from_dict_takes_a_partial_map():
    assert params_from_dict({"max_tokens": 3}) == SamplingParams(max_tokens=3)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([("max_tokens", 3)], "map"),
        ({"max_tokens": 3, "evil": 1}, "unknown"),
        ({b"max_tokens": 3}, "unknown"),
        ({"stop": "END"}, "stop: must be a list"),
        ({"stop_token_ids": (1, 2)}, "stop_token_ids: must be a list"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"skip_special_tokens": "no"}, "skip_special_tokens"),
        ({"temperature": "hot"}, "temperature"),  # SamplingParams' own ValueError
        ({"top_p": 0.0}, "top_p"),
        ({"n": True}, "n"),
        ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        ({"stop": [1]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": 2**64}, "seed"),
        ({"logprobs": 99}, "logprobs"),
    ],
)
def test_params_from_dict_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        params_from_dict(bad)


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=6),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(params_to_dict(FULL))), plain, max_size=6))
def test_params_from_random_maps_only_raise_value_error(d):
    try:
        params = params_from_dict(d)
    except ValueError:
        return
    assert params_from_dict(params_to_dict(params)) == params
