"""The one encoder and decoder of wire messages: a msgpack header frame, then raw payload frames.

Header: {"t": type name, "v": PROTOCOL_VERSION, "f": {field: value}}. The decoder trusts nothing:
msgpack is told the largest string, array and map before it allocates, the field set must be
exact, every value is checked against its dataclass annotation, and a KVChunk's payload must be
exactly `num_blocks` frames of one block each. Anything off raises WireError, which callers log
and drop; nothing else escapes `decode`.

Peers of another protocol version: `decode` refuses their frames, but `peek` still reads a
header's type and version, and `encode_as` writes the few messages whose fields have not changed
in an older version's header, so a router can tell an outdated worker why it is refused.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable

import msgpack

from baton.server.wire.messages import MESSAGES, KVChunk, KVLayout, RegisterReply, WorkerCPU

# 2: KV checksums are XXH3-64 (were crc32); 3: failover and drain fields; 4: Register.cpu;
# 5: a failure is its own RequestFailed (TokenOutput lost error and retry), Register lost version
# 6: SamplingParams' guided fields, RequestFailed.bad_request, strings up to 256 KiB
PROTOCOL_VERSION = 7
# The first version whose fields of a message are this version's: `encode_as` may write it for a
# peer of any version from there on (the header's layout has been the same since version 1).
UNCHANGED_SINCE = {RegisterReply.TYPE: 1}
MAX_HEADER_BYTES = 1 << 20
MAX_LIST_LEN = 1 << 20  # token ids in a prompt; the header limit usually bites first
MAX_MAP_LEN = 64
MAX_STR_LEN = 1 << 18  # a guided spec (schema, grammar) is the longest
MAX_PAYLOAD_FRAMES = 1 << 16


NESTED = (KVLayout, WorkerCPU)  # dataclasses that travel inside messages, as maps


class WireError(ValueError):
    """A frame that is not a well-formed message of this protocol."""


# ---- encode --------------------------------------------------------------------------------


def encode(msg, payload=()) -> list[bytes | memoryview]:
    """Frames for `socket.send_multipart(frames, copy=False)`: the header, then `payload` as is.

    NOTE: with copy=False zmq reads the payload after this returns; the sender must not change
    those bytes until the peer has acknowledged them.
    """
    return _encode(msg, payload, PROTOCOL_VERSION)


def encode_as(msg, version: int) -> list[bytes]:
    """Frames of `msg` that a peer speaking protocol `version` decodes: allowed only for a message
    whose fields have not changed since (`UNCHANGED_SINCE`), so only the header's "v" differs.
    ValueError for any other message or version (a newer one included: its fields are unknown)."""
    since = UNCHANGED_SINCE.get(getattr(type(msg), "TYPE", None))
    if since is None or type(version) is not int or not since <= version <= PROTOCOL_VERSION:
        raise ValueError(f"cannot write a {type(msg).__name__} in protocol version {version!r}")
    return _encode(msg, (), version)


def _encode(msg, payload, version: int) -> list[bytes | memoryview]:
    cls = type(msg)
    if MESSAGES.get(getattr(cls, "TYPE", None)) is not cls:
        raise TypeError(f"not a wire message: {cls.__name__}")
    payload = list(payload)
    _check_payload(msg, [_buffer(f) for f in payload])
    try:
        header = msgpack.packb({"t": cls.TYPE, "v": version, "f": _fields_of(msg)})
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"{cls.TYPE}: a field is not msgpack-native: {e}") from None
    if len(header) > MAX_HEADER_BYTES:
        raise WireError(f"{cls.TYPE}: header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    return [header, *payload]


def _fields_of(obj) -> dict:
    # shallow on purpose: a prompt's token list is packed as is, not copied
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = _fields_of(v) if isinstance(v, NESTED) else v
    return out


# ---- decode --------------------------------------------------------------------------------


def decode(frames) -> tuple[object, list[memoryview]]:
    """(message, payload frames as byte memoryviews) from received frames (bytes, memoryview or
    zmq.Frame, without the ROUTER identity); WireError if anything is malformed."""
    frames, obj = _unpack_header(frames)
    if obj.keys() != {"t", "v", "f"}:
        raise WireError("header must be a map with exactly the keys t, v, f")
    version, name = obj["v"], obj["t"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(f"protocol version {version!r} is not {PROTOCOL_VERSION}")
    cls = MESSAGES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise WireError(f"unknown message type {name!r}")
    msg = _build(cls, obj["f"], cls.TYPE)
    payload = [_buffer(f) for f in frames[1:]]
    _check_payload(msg, payload)
    return msg, payload


def peek(frames) -> tuple[str, int]:
    """(type name, protocol version) of received frames, whatever their version: only the
    header's "t" and "v" are read, under `decode`'s limits; WireError if they are malformed."""
    _, obj = _unpack_header(frames)
    name, version = obj.get("t"), obj.get("v")
    if type(name) is not str or type(version) is not int:
        raise WireError("header must be a map with a str t and an int v")
    return name, version


def _unpack_header(frames) -> tuple[list, dict]:
    """(frames as a list, the header frame unpacked to a map) under every msgpack limit."""
    try:
        frames = list(frames)
    except TypeError:
        raise WireError(f"frames must be a sequence, got {type(frames).__name__}") from None
    if not frames:
        raise WireError("no frames")
    head = _buffer(frames[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header of {head.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        obj = msgpack.unpackb(
            head,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_STR_LEN,
            max_bin_len=0,  # no bytes in headers: bulk data travels as payload frames
            max_array_len=MAX_LIST_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several unrelated types (ValueError, StackError ...)
        raise WireError(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise WireError(f"header must be a map, got {type(obj).__name__}")
    return frames, obj


def _buffer(frame) -> memoryview:
    try:
        mv = memoryview(getattr(frame, "buffer", frame))  # zmq.Frame exposes .buffer
        return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
    except Exception as e:  # not a buffer, or not a contiguous one
        raise WireError(f"a frame is not a contiguous buffer: {type(frame).__name__}") from e


def _check_payload(msg, payload: list[memoryview]) -> None:
    if not isinstance(msg, KVChunk):
        if payload:
            raise WireError(f"{msg.TYPE} carries no payload, got {len(payload)} frames")
        return
    if len(payload) != msg.num_blocks or len(payload) > MAX_PAYLOAD_FRAMES:
        raise WireError(f"kv_chunk announces {msg.num_blocks} blocks, got {len(payload)} frames")
    want = msg.block_nbytes
    for i, p in enumerate(payload):
        if p.nbytes != want:
            raise WireError(f"kv_chunk frame {i} has {p.nbytes} bytes, a block has {want}")
    # num_blocks * block_nbytes == nbytes is KVChunk's own invariant, so the total matches too


def _build(cls, fields, where: str):
    if not isinstance(fields, dict):
        raise WireError(f"{where}: fields must be a map, got {type(fields).__name__}")
    checkers = _CHECKERS[cls]
    if fields.keys() != checkers.keys():
        missing = sorted(checkers.keys() - fields.keys())
        extra = sorted(map(repr, fields.keys() - checkers.keys()))
        raise WireError(f"{where}: missing fields {missing}, unexpected fields {extra}")
    values = {name: check(f"{where}.{name}", fields[name]) for name, check in checkers.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:  # the message's own value invariants
        raise WireError(f"{where}: {e}") from None


# ---- field checkers, compiled once from the annotations ----------------------------------------

Checker = Callable[[str, object], object]


def _fail(where: str, want: str, value) -> typing.NoReturn:
    raise WireError(f"{where}: expected {want}, got {type(value).__name__}")


def _check_bool(where, v):
    return v if type(v) is bool else _fail(where, "bool", v)


def _check_int(where, v):
    return v if type(v) is int else _fail(where, "int", v)  # bool is not an int here


def _check_float(where, v):
    return float(v) if type(v) in (float, int) else _fail(where, "float", v)


def _check_str(where, v):
    return v if type(v) is str else _fail(where, "str", v)


def _check_dict(where, v):
    if type(v) is not dict:
        _fail(where, "map", v)
    if not all(type(k) is str for k in v):
        raise WireError(f"{where}: map keys must be strings")
    return v


def _check_list(where, v):
    return v if type(v) is list else _fail(where, "list", v)


def _check_int_list(where, v):
    if type(v) is not list:
        _fail(where, "list of int", v)
    if not all(type(x) is int for x in v):
        raise WireError(f"{where}: expected a list of int")
    return v


def _checker(tp) -> Checker:
    simple = {bool: _check_bool, int: _check_int, float: _check_float, str: _check_str}
    if tp in simple:
        return simple[tp]
    if tp is dict:
        return _check_dict
    if tp is list:
        return _check_list
    if typing.get_origin(tp) is list and typing.get_args(tp) == (int,):
        return _check_int_list
    if dataclasses.is_dataclass(tp):
        return lambda where, v: _build(tp, v, where)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        if len(args) == 2 and len(inner) == 1:
            check = _checker(inner[0])
            return lambda where, v: None if v is None else check(where, v)
    raise TypeError(f"the wire cannot carry a field annotated {tp!r}")  # a bug in messages.py


def _compile(cls) -> dict[str, Checker]:
    hints = typing.get_type_hints(cls)
    return {f.name: _checker(hints[f.name]) for f in dataclasses.fields(cls)}


_CHECKERS: dict[type, dict[str, Checker]] = {
    cls: _compile(cls) for cls in (*NESTED, *MESSAGES.values())
}
