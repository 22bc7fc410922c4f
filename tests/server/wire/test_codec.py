"""The codec round-trips every message and turns anything malformed into WireError, only."""

from __future__ import annotations

import dataclasses
import struct

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.scheduler.sampling_params import SamplingParams
from baton.server.wire import codec
from baton.server.wire import messages as m
from baton.server.wire.params import params_from_dict, params_to_dict

LAYOUT = m.KVLayout(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64, dtype="bfloat16")
PARAMS = params_to_dict(SamplingParams(max_tokens=5, stop=["a"], stop_token_ids=[7], seed=3))
LOGPROB = [4, -0.5, [[4, -0.5], [9, -1.25]]]
CHUNK = m.KVChunk(  # 8-byte blocks
    request_id="r",
    first_block=2,
    num_blocks=2,
    block_shape=[1, 2, 1, 1, 2],
    dtype="float16",
    nbytes=16,
    checksum=1234,
)
REG = m.Register(
    worker_id="w0",
    role="decode",
    pid=41,
    host="127.0.0.1",
    model="smollm2",
    layout=LAYOUT,
    kv_endpoint="tcp://h:1",
    max_model_len=8192,
    num_blocks=100,
)
HB = m.Heartbeat(
    worker_id="w0",
    running=1,
    waiting=2,
    kv_usage=0.5,
    num_free_blocks=10,
    prefix_queries=3,
    prefix_hits=1,
)
GEN = m.Generate(
    request_id="r",
    prompt_token_ids=[1, 2, 3],
    params=PARAMS,
    decode_worker_id="d",
    decode_endpoint="tcp://h:1",
)
TOK = m.TokenOutput(
    request_id="r",
    worker_id="w",
    token_ids=[4],
    logprobs=[LOGPROB],
    finish_reason=None,
    stop_reason=None,
    num_cached_tokens=16,
)
DONE = m.KVDone(
    request_id="r", num_blocks=2, first_token=5, first_logprobs=LOGPROB, num_cached_tokens=16
)
ACK = m.KVAck(request_id="r", ok=True, reason="")
FAILED = m.RequestFailed(request_id="r", worker_id="w", error="draining", retry=True)
SAMPLES = [
    REG,
    m.RegisterReply(accepted=False, reason="layout differs"),
    HB,
    GEN,
    dataclasses.replace(GEN, prompt_token_ids=list(range(50_000)), params={}, decode_endpoint=""),
    m.Abort(request_id="r"),
    TOK,
    dataclasses.replace(
        TOK, token_ids=[], logprobs=None, finish_reason="stop", stop_reason=2, queue_time_s=0.5
    ),
    FAILED,
    dataclasses.replace(FAILED, error="bad params", retry=False),
    m.KVOpen(
        request_id="r", prefill_worker_id="p", prompt_token_ids=[1, 2], params=PARAMS, layout=LAYOUT
    ),
    m.KVOpenReply(request_id="r", ok=True, reason=""),
    CHUNK,
    DONE,
    dataclasses.replace(DONE, first_logprobs=None, num_cached_tokens=0),
    ACK,
    m.KVAbort(request_id="r", reason="aborted"),
    m.KVReport(request_id="r", nbytes=1 << 20, seconds=0.25, ok=True),
    m.KVEvents(worker_id="w0", seq=3, reset=False, stored=[1, (1 << 63) - 1], removed=[7]),
    m.KVEvents(worker_id="w0", seq=0, reset=True, stored=list(range(50_000)), removed=[]),
    m.KVResync(reason="batch 4 out of order"),
    dataclasses.replace(HB, running=0, waiting=0, kv_usage=0.0, draining=True),
    m.Deregister(worker_id="w0", reason="drained"),
    m.Reconnect(reason="unknown worker"),
    dataclasses.replace(GEN, decode_worker_id="", decode_endpoint="", prior_output_ids=[4, 5]),
    dataclasses.replace(
        REG,
        worker_id="w1",
        role="prefill",
        kv_endpoint="",
        cpu=m.WorkerCPU(threads=2, wait_policy="brief", cpus="0-1", linear="dense@1,mkl-packed@3"),
    ),
]
PAYLOAD = [b"abcdefgh", b"ijklmnop"]
LAYOUT_MAP = dataclasses.asdict(LAYOUT)


def payload_of(msg):
    return PAYLOAD if isinstance(msg, m.KVChunk) else []


def header(t, fields, v=codec.PROTOCOL_VERSION):
    return [msgpack.packb({"t": t, "v": v, "f": fields})]


def fields(msg, **changes):
    return {**dataclasses.asdict(msg), **changes}


def test_samples_cover_every_message_type():
    assert {type(s).TYPE for s in SAMPLES} == set(m.MESSAGES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
@pytest.mark.parametrize("as_frame", [bytes, memoryview, zmq.Frame], ids=lambda f: f.__name__)
def test_round_trip(msg, as_frame):
    frames = codec.encode(msg, payload_of(msg))
    assert isinstance(frames[0], bytes)
    got, payload = codec.decode([as_frame(bytes(f)) for f in frames])
    assert got == msg and type(got) is type(msg)
    assert [bytes(p) for p in payload] == payload_of(msg)
    assert all(isinstance(p, memoryview) for p in payload)


def test_encode_passes_payload_through_untouched():
    views = [memoryview(p) for p in PAYLOAD]
    frames = codec.encode(CHUNK, views)
    assert frames[1] is views[0] and frames[2] is views[1]  # zero-copy: sent as given


def test_float_fields_take_ints_and_hand_back_floats():
    msg, _ = codec.decode(header("heartbeat", fields(HB, kv_usage=1)))
    assert msg.kv_usage == 1.0 and type(msg.kv_usage) is float


def test_encode_refuses_what_decode_would_refuse():
    with pytest.raises(TypeError):
        codec.encode(dataclasses.replace(LAYOUT, dtype="float32"))
    with pytest.raises(TypeError):
        codec.encode({"t": "abort"})
    with pytest.raises(codec.WireError, match="no payload"):
        codec.encode(m.Abort(request_id="r"), [b"x"])
    with pytest.raises(codec.WireError, match="frames"):
        codec.encode(CHUNK, PAYLOAD[:1])
    with pytest.raises(codec.WireError, match="bytes"):
        codec.encode(CHUNK, [PAYLOAD[0], PAYLOAD[1][:-1]])
    with pytest.raises(codec.WireError, match="msgpack"):
        codec.encode(dataclasses.replace(GEN, params={"x": object()}))
    with pytest.raises(codec.WireError, match="exceeds"):
        codec.encode(dataclasses.replace(GEN, prompt_token_ids=[1 << 20] * 300_000, params={}))


def p(frames, id):
    return pytest.param(frames, id=id)


def raw(t, v, f):
    return [msgpack.packb({"t": t, "v": v, "f": f})]


@pytest.mark.parametrize(
    "frames",
    [
        p([], "no frames"),
        p(None, "not a sequence"),
        p([None], "frame not a buffer"),
        p(["abort"], "frame is str"),
        p([b""], "empty header"),
        p([b"\xc1"], "reserved byte"),
        p([header("abort", {"request_id": "r"})[0] + b"\x00"], "trailing bytes"),
        p([msgpack.packb([1, 2, 3])], "not a map"),
        p([msgpack.packb({"t": "abort", "v": 1})], "no f"),
        p([msgpack.packb({"t": "abort", "v": 1, "f": {}, "x": 0})], "extra key"),
        p(header("abort", {"request_id": "r"}, v=99), "version"),
        p(header("abort", {"request_id": "r"}, v=True), "version bool"),
        p(header("abort", {"request_id": "r"}, v=1.0), "version float"),
        p(header("nope", {}), "unknown type"),
        p(header(["abort"], {}), "type not str"),
        p(header("abort", [("request_id", "r")]), "fields not a map"),
        p(header("abort", {}), "missing field"),
        p(header("abort", {"request_id": "r", "extra": 1}), "extra field"),
        p(header("abort", {"request_id": 5}), "int for str"),
        p(header("abort", {"request_id": None}), "None for str"),
        p(header("abort", {"request_id": b"r"}), "bin for str"),
        p(header("heartbeat", fields(HB, running=True)), "bool for int"),
        p(header("heartbeat", fields(HB, running=1.0)), "float for int"),
        p(header("heartbeat", fields(HB, kv_usage=False)), "bool for float"),
        p(header("heartbeat", fields(HB, kv_usage="0.5")), "str for float"),
        p(header("kv_ack", fields(ACK, ok=1)), "int for bool"),
        p(header("generate", fields(GEN, prompt_token_ids="abc")), "str for list"),
        p(header("generate", fields(GEN, prompt_token_ids=[1, "2"])), "str in ids"),
        p(header("generate", fields(GEN, prompt_token_ids=[1, True])), "bool in ids"),
        p(header("generate", fields(GEN, prompt_token_ids=[1.0])), "float in ids"),
        p(header("generate", fields(GEN, prompt_token_ids=[-1])), "negative id"),
        p(header("generate", fields(GEN, params=[1])), "params not a map"),
        p(header("generate", fields(GEN, params={1: 2})), "int map key"),
        p(header("generate", fields(GEN, params={f"k{i}": i for i in range(65)})), "big map"),
        p(header("token_output", fields(TOK, logprobs={"a": 1})), "map for list"),
        p(header("token_output", fields(TOK, logprobs=[[4, -0.5]])), "bad logprobs"),
        p(header("token_output", fields(TOK, stop_reason="2")), "str for int|None"),
        p(header("token_output", fields(TOK, finish_reason=1)), "int for str|None"),
        p(header("token_output", fields(TOK, error="boom")), "token_output with an error"),
        p(header("request_failed", fields(FAILED, retry=1)), "int for bool"),
        p(header("request_failed", fields(FAILED, retry=None)), "None for bool"),
        p(header("kv_done", fields(DONE, first_logprobs=[1, 2, 3])), "bad first logprobs"),
        p(header("register", fields(REG, layout=None)), "layout None"),
        p(header("register", fields(REG, layout={"num_layers": 1})), "layout short"),
        p(header("register", fields(REG, layout={**LAYOUT_MAP, "dtype": "int4"})), "layout dt"),
        p(header("register", fields(REG, layout={**LAYOUT_MAP, "head_dim": 64.0})), "layout fl"),
        p(header("register", fields(REG, layout={**LAYOUT_MAP, "x": 1})), "layout extra"),
        p(header("register", fields(REG, role="root")), "bad role"),
        p(header("register", fields(REG, version="0.1.0")), "register with a version"),
        p(header("register", fields(REG), v=4), "an older version"),
        p(header("kv_chunk", fields(CHUNK, nbytes=17)) + PAYLOAD, "chunk nbytes"),
        p(header("kv_chunk", fields(CHUNK, checksum=-1)) + PAYLOAD, "chunk crc"),
        p(header("kv_chunk", fields(CHUNK, dtype="float64")) + PAYLOAD, "chunk dtype"),
        p(header("kv_chunk", fields(CHUNK)), "chunk without payload"),
        p(header("kv_chunk", fields(CHUNK)) + PAYLOAD[:1], "chunk one frame short"),
        p(header("kv_chunk", fields(CHUNK)) + PAYLOAD * 2, "chunk two frames over"),
        p(header("kv_chunk", fields(CHUNK)) + [b"abcdefg", b"hijklmnop"], "chunk uneven"),
        p(header("kv_chunk", fields(CHUNK)) + [b"abcdefgh", b""], "chunk empty frame"),
        p(header("kv_chunk", fields(CHUNK)) + [b"abcdefgh", None], "chunk None frame"),
        p(header("abort", {"request_id": "r"}) + [b"x"], "payload on abort"),
        p(header("abort", {"request_id": "x" * (codec.MAX_STR_LEN + 1)}), "long str"),
        p(raw("abort", msgpack.ExtType(1, b"x"), {}), "ext type"),
        p(raw("abort", 1, {"request_id": b"x" * 8}), "bin in header"),
        p([b"\x91" * 100_000], "deep nesting"),
        p([b"\xdd\xff\xff\xff\xff"], "array32 of 4G"),
        p([b"\xdf\xff\xff\xff\xff"], "map32 of 4G"),
        p([b"\xdb\xff\xff\xff\xff"], "str32 of 4G"),
        p([b"\x00" * (codec.MAX_HEADER_BYTES + 1)], "header too big"),
        p(header("generate", fields(GEN, prompt_token_ids=[0] * codec.MAX_LIST_LEN)), "big prompt"),
    ],
)
def test_malformed_frames_raise_wire_error(frames):
    with pytest.raises(codec.WireError):
        codec.decode(frames)


def only_wire_errors(frames) -> None:
    """decode either refuses with WireError or returns a message that round-trips."""
    try:
        msg, payload = codec.decode(frames)
    except codec.WireError:
        return
    again, _ = codec.decode(codec.encode(msg, payload))
    # compare the encodings: a NaN float is not equal to itself
    assert codec.encode(again, payload)[0] == codec.encode(msg, payload)[0]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
def test_random_bytes_only_raise_wire_error(frames):
    only_wire_errors(frames)


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=4),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(m.MESSAGES)) | st.text(max_size=8),
    st.just(codec.PROTOCOL_VERSION) | plain,
    st.dictionaries(st.text(max_size=12), plain) | plain,
)
def test_random_maps_only_raise_wire_error(t, v, f):
    only_wire_errors(raw(t, v, f))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_one_wrong_field_only_raises_wire_error(msg, data):
    good = dataclasses.asdict(msg)
    name = data.draw(st.sampled_from(sorted(good)))
    good[name] = data.draw(plain)
    only_wire_errors(header(type(msg).TYPE, good) + payload_of(msg))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([b"\xdc", b"\xde", b"\xda", b"\xc5"]) | st.just(b""),
    st.sampled_from([b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9"]),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=32),
)
def test_oversize_containers_only_raise_wire_error(tag16, tag32, n, rest):
    # a container that announces up to 4G entries must be refused before anything is allocated
    body = tag16 + struct.pack(">H", n & 0xFFFF) if tag16 else tag32 + struct.pack(">I", n)
    only_wire_errors([body + rest])
    only_wire_errors([b"\x83\xa1t\xa5abort\xa1v\x01\xa1f" + body + rest])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 2**31), max_size=64),
    st.lists(
        st.tuples(
            st.integers(0, 2**31),
            st.floats(allow_nan=False),
            st.lists(st.tuples(st.integers(0, 2**31), st.floats(allow_nan=False)), max_size=4),
        ),
        max_size=8,
    )
    | st.none(),
    st.sampled_from([None, "stop", "length", "abort"]),
    st.none() | st.integers(0, 2**31),
)
def test_token_outputs_round_trip(ids, lps, finish, stop):
    lps = None if lps is None else [[t, lp, [list(x) for x in top]] for t, lp, top in lps]
    msg = m.TokenOutput(
        request_id="req",
        worker_id="w",
        token_ids=ids,
        logprobs=lps,
        finish_reason=finish,
        stop_reason=stop,
        num_cached_tokens=len(ids),
    )
    assert codec.decode(codec.encode(msg)) == (msg, [])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 2**32), max_size=2000),
    st.builds(
        SamplingParams,
        temperature=st.floats(0, 2),
        top_k=st.integers(0, 100),
        seed=st.none() | st.integers(0, 2**63 - 1),
        max_tokens=st.none() | st.integers(1, 4096),
        stop=st.lists(st.text(min_size=1, max_size=5), max_size=3),
        stop_token_ids=st.lists(st.integers(0, 2**20), max_size=3),
        logprobs=st.none() | st.integers(0, 20),
    ),
)
def test_generate_round_trips_with_its_params(ids, params):
    msg = m.Generate(
        request_id="req",
        prompt_token_ids=ids,
        params=params_to_dict(params),
        decode_worker_id="d",
        decode_endpoint="ipc://x",
    )
    got, _ = codec.decode(codec.encode(msg))
    assert got == msg and params_from_dict(got.params) == params


def test_messages_take_keywords_only():
    with pytest.raises(TypeError):
        m.Abort("r")
    with pytest.raises(TypeError):
        m.KVLayout(30, 16, 3, 64, "bfloat16")


# ---- peers of another protocol version -----------------------------------------------------


@pytest.mark.parametrize("as_frame", [bytes, memoryview, zmq.Frame], ids=lambda f: f.__name__)
def test_peek_reads_type_and_version_of_any_version(as_frame):
    assert codec.peek([as_frame(f) for f in codec.encode(REG)]) == (
        "register",
        codec.PROTOCOL_VERSION,
    )
    old = fields(REG, version="0.1.0")  # a version-4 Register: fields this codec refuses
    assert codec.peek([as_frame(header("register", old, v=4)[0])]) == ("register", 4)
    assert codec.peek(raw("whatever", 99, None)) == ("whatever", 99)
    assert codec.peek(codec.encode(CHUNK, PAYLOAD)) == ("kv_chunk", codec.PROTOCOL_VERSION)


@pytest.mark.parametrize(
    "frames",
    [
        p([], "no frames"),
        p(None, "not a sequence"),
        p([None], "frame not a buffer"),
        p([b""], "empty header"),
        p([b"\xc1"], "reserved byte"),
        p([b"garbage, not msgpack"], "garbage"),
        p([msgpack.packb([1, 2, 3])], "not a map"),
        p([msgpack.packb({"v": 4, "f": {}})], "no t"),
        p([msgpack.packb({"t": "register", "f": {}})], "no v"),
        p(raw(["register"], 4, {}), "t not str"),
        p(raw("register", "4", {}), "v not int"),
        p(raw("register", True, {}), "v bool"),
        p(raw("register", 4.0, {}), "v float"),
        p(raw("register", 4, {"x": b"bytes"}), "bin in header"),
        p(raw("register", 4, {"x": "x" * (codec.MAX_STR_LEN + 1)}), "long str"),
        p(raw("register", 4, {f"k{i}": i for i in range(codec.MAX_MAP_LEN + 1)}), "big map"),
        p([b"\xdd\xff\xff\xff\xff"], "array32 of 4G"),
        p([b"\x91" * 100_000], "deep nesting"),
        p([b"\x00" * (codec.MAX_HEADER_BYTES + 1)], "header too big"),
    ],
)
def test_peek_refuses_malformed_headers_with_wire_error(frames):
    with pytest.raises(codec.WireError):
        codec.peek(frames)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
def test_peek_of_random_bytes_only_raises_wire_error(frames):
    try:
        name, version = codec.peek(frames)
    except codec.WireError:
        return
    assert type(name) is str and type(version) is int


@pytest.mark.parametrize("version", [1, 2, 3, 4, codec.PROTOCOL_VERSION])
def test_a_register_reply_is_written_in_an_older_version_unchanged(version):
    reply = m.RegisterReply(accepted=False, reason="protocol version 4 is not this router's 5")
    frames = codec.encode_as(reply, version)
    assert msgpack.unpackb(frames[0]) == {
        "t": "register_reply",
        "v": version,
        "f": {"accepted": False, "reason": reply.reason},
    }
    assert codec.peek(frames) == ("register_reply", version)


@pytest.mark.parametrize(
    "msg, version",
    [
        (m.RegisterReply(accepted=True, reason=""), 0),
        (m.RegisterReply(accepted=True, reason=""), codec.PROTOCOL_VERSION + 1),
        (m.RegisterReply(accepted=True, reason=""), True),
        (REG, 4),  # fields changed in version 5
        (TOK, 4),
    ],
)
def test_encode_as_refuses_what_the_peer_could_not_read(msg, version):
    with pytest.raises(ValueError):
        codec.encode_as(msg, version)
