"""Messages hold their value invariants; SamplingParams crosses the wire unchanged or not at all."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.scheduler.sampling_params import SamplingParams
from baton.server.wire import messages as m

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
    d = m.params_to_dict(params)
    assert isinstance(d["stop"], list) and isinstance(d["stop_token_ids"], list)
    assert "extra" not in d
    wire = msgpack.unpackb(msgpack.packb(d))
    assert wire == d
    back = m.params_from_dict(wire)
    assert back == params
    assert back.stop == params.stop and back.stop_token_ids == params.stop_token_ids


def test_params_dict_names_every_field_but_extra():
    names = {f.name for f in dataclasses.fields(SamplingParams)} - {"extra"}
    assert set(m.params_to_dict(FULL)) == names


def test_params_from_dict_takes_a_partial_map():
    assert m.params_from_dict({"max_tokens": 3}) == SamplingParams(max_tokens=3)


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
        m.params_from_dict(bad)


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=6),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(m.params_to_dict(FULL))), plain, max_size=6))
def test_params_from_random_maps_only_raise_value_error(d):
    try:
        params = m.params_from_dict(d)
    except ValueError:
        return
    assert m.params_from_dict(m.params_to_dict(params)) == params


def test_every_message_has_a_unique_type_name_and_is_frozen():
    assert len(m.MESSAGES) == 15
    for name, cls in m.MESSAGES.items():
        assert name == cls.TYPE and dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.Abort("r").request_id = "s"


LAYOUT = m.KVLayout(30, 16, 3, 64, "float32")
BLOCK = [30, 2, 16, 3, 64]
BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4


def test_kv_chunk_knows_its_block_size():
    assert m.KVChunk("r", 0, 2, BLOCK, "float32", 2 * BLOCK_BYTES, 0).block_nbytes == BLOCK_BYTES
    half = m.KVChunk("r", 0, 1, BLOCK, "bfloat16", BLOCK_BYTES // 2, 0)
    assert half.block_nbytes == BLOCK_BYTES // 2


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: m.KVLayout(30, 0, 3, 64, "float32"), "block_size"),
        (lambda: m.KVLayout(30, 16, 3, 64, "float64"), "dtype"),
        (lambda: m.Register("w", "router", 1, "h", "x", LAYOUT, "e", 8, 8, "0"), "role"),
        (lambda: m.Register("w", "both", 1, "h", "x", LAYOUT, "e", 8, -1, "0"), "num_blocks"),
        (lambda: m.WorkerCPU(0, "brief", "0", ""), "threads"),
        (lambda: m.Heartbeat("w", -1, 0, 0.0, 0, 0, 0), "running"),
        (lambda: m.Generate("r", [1], {}, "", "", prior_output_ids=[-1]), "prior_output_ids"),
        (lambda: m.Generate("r", [1], {}, "d", "tcp://d:1", [2]), "recomputed where it decodes"),
        (lambda: m.Generate("r", [1, -2], {}, "", ""), "prompt_token_ids"),
        (lambda: m.KVOpen("r", "p", [-1], {}, LAYOUT), "prompt_token_ids"),
        (lambda: m.TokenOutput("r", "w", [1], [[1, -0.1]], None, None, 0, ""), "logprobs"),
        (lambda: m.TokenOutput("r", "w", [1], [[1, -0.1, [[2]]]], None, None, 0, ""), "logprobs"),
        (lambda: m.TokenOutput("r", "w", [1], [[1, "x", []]], None, None, 0, ""), "logprobs"),
        (lambda: m.TokenOutput("r", "w", [1], None, None, None, -1, ""), "num_cached_tokens"),
        (lambda: m.TokenOutput("r", "w", [1], None, None, None, 0, "", -1.0), "queue_time_s"),
        (lambda: m.KVReport("r", -1, 0.1, True), "nbytes"),
        (lambda: m.KVReport("r", 1, -0.1, False), "seconds"),
        (lambda: m.KVChunk("r", -1, 1, BLOCK, "float32", BLOCK_BYTES, 0), "first_block"),
        (lambda: m.KVChunk("r", 0, 0, BLOCK, "float32", 0, 0), "num_blocks"),
        (lambda: m.KVChunk("r", 0, 1, BLOCK[:4], "float32", BLOCK_BYTES, 0), "block_shape"),
        (lambda: m.KVChunk("r", 0, 1, [30, 3, 16, 3, 64], "float32", 1, 0), "block_shape"),
        (lambda: m.KVChunk("r", 0, 1, BLOCK, "int8", BLOCK_BYTES, 0), "dtype"),
        (lambda: m.KVChunk("r", 0, 1, BLOCK, "float32", BLOCK_BYTES - 1, 0), "nbytes"),
        (lambda: m.KVChunk("r", 0, 1, BLOCK, "float32", BLOCK_BYTES, 1 << 64), "checksum"),
        (lambda: m.KVDone("r", 1, 5, [5, -0.1], 0), "first_logprobs"),
        (lambda: m.KVDone("r", 1, -5, None, 0), "first_token"),
    ],
)
def test_messages_refuse_impossible_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_logprob_entries_of_the_documented_shape_are_fine():
    entry = [5, -0.25, [[5, -0.25], [9, -2]]]
    assert m.TokenOutput("r", "w", [5], [entry], None, None, 0, "").logprobs == [entry]
    assert m.KVDone("r", 1, 5, entry, 0).first_logprobs == entry


def test_messages_and_codec_import_neither_torch_nor_zmq():
    code = (
        "import sys; import baton.server.wire.codec, baton.server.wire.messages; "
        "print(sorted(k for k in ('torch', 'zmq', 'numpy') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
