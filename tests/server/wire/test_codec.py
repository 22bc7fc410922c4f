"""The codec round-trips every message and turns anything malformed into WireError only."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.scheduler.sampling_params import SamplingParams
from baton.server.wire import codec
from baton.server.wire import messages as m

LAYOUT = m.KVLayout(30, 16, 3, 64, "float32")
PARAMS = m.params_to_dict(SamplingParams(max_tokens=5, stop=["a"], stop_token_ids=[7], seed=3))
SAMPLES = [
    m.Register("w", "decode", 1, "h", "smollm2", LAYOUT, "tcp://h:1", 8192, 100, "0"),
    m.RegisterReply(False, "layout differs"),
    m.Heartbeat("w", 1, 2, 0.5, 10, 3, 1),
    m.Generate("r", [1, 2, 3], PARAMS, "d", "tcp://h:1"),
    m.Abort("r"),
    m.TokenOutput("r", "w", [4], [[4, -0.5, [[4, -0.5], [9, -1.0]]]], None, None, 16, ""),
    m.TokenOutput("r", "w", [], None, "stop", 2, 0, ""),
    m.KVOpen("r", "p", [1, 2], PARAMS, LAYOUT),
    m.KVOpenReply("r", True, ""),
    m.KVDone("r", 2, 5, None, 0),
    m.KVAck("r", True, ""),
    m.KVAbort("r", "aborted"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip(msg):
    got, payload = codec.decode(codec.encode(msg))
    assert got == msg and payload == []


def test_kv_chunk_needs_its_payload():
    chunk = m.KVChunk("r", 0, 2, [1, 2], "float32", 8, 0)
    got, payload = codec.decode(codec.encode(chunk, [b"abcd", b"efgh"]))
    assert got == chunk and [bytes(p) for p in payload] == [b"abcd", b"efgh"]
    for frames in ([b"abcd"], [b"abcd", b"efg"], [b"abcd", b"efgh", b"ijkl"]):
        with pytest.raises(codec.WireError):
            codec.decode(codec.encode(chunk, frames))


def test_params_survive_the_wire():
    assert m.params_from_dict(PARAMS) == SamplingParams(
        max_tokens=5, stop=["a"], stop_token_ids=[7], seed=3
    )
    with pytest.raises(ValueError, match="unknown"):
        m.params_from_dict({**PARAMS, "evil": 1})
    with pytest.raises(ValueError, match="temperature"):
        m.params_from_dict({**PARAMS, "temperature": "hot"})


def header(t, fields, v=codec.PROTOCOL_VERSION):
    return [msgpack.packb({"t": t, "v": v, "f": fields})]


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"\xc1"],
        [msgpack.packb([1, 2, 3])],
        header("abort", {"request_id": "r"}, v=99),
        header("nope", {}),
        header("abort", {}),
        header("abort", {"request_id": "r", "extra": 1}),
        header("abort", {"request_id": 5}),
        header("heartbeat", {**codec._to_plain(SAMPLES[2]), "running": True}),
        header("generate", {**codec._to_plain(SAMPLES[3]), "prompt_token_ids": ["a"]}),
        header("register", {**codec._to_plain(SAMPLES[0]), "layout": {"num_layers": 1}}),
        [msgpack.packb({"t": "abort", "v": 1, "f": {"request_id": "x" * (1 << 17)}})],
        [b"\x00" * (codec.MAX_HEADER_BYTES + 1)],
    ],
)
def test_malformed_frames_raise_wire_error(frames):
    with pytest.raises(codec.WireError):
        codec.decode(frames)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
def test_random_bytes_only_raise_wire_error(frames):
    with contextlib.suppress(codec.WireError):
        codec.decode(frames)


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(m.MESSAGES)), st.dictionaries(st.text(max_size=12), plain))
def test_random_fields_only_raise_wire_error(t, fields):
    with contextlib.suppress(codec.WireError):
        codec.decode(header(t, fields))
