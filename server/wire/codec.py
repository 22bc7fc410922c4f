"""The one encoder and decoder of wire messages: a msgpack header frame, then raw payload frames.

The decoder trusts nothing: sizes are bounded before msgpack allocates, the field set must be
exact, and every value is checked against the dataclass annotation. Anything off raises
WireError, which callers log and drop.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache

import msgpack

from baton.server.wire.messages import MESSAGES, KVChunk, KVLayout

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_LIST = 1 << 20  # token ids in a prompt, entries in a list
MAX_STR = 1 << 16
MAX_PAYLOAD_FRAMES = 1 << 16
MAX_PAYLOAD_BYTES = 1 << 34


class WireError(ValueError):
    """A frame that is not a well-formed message of this protocol."""


def encode(msg, payload=()) -> list:
    """Frames for `socket.send_multipart(frames, copy=False)`: header, then `payload` as is."""
    if type(msg).TYPE not in MESSAGES:
        raise TypeError(f"not a wire message: {msg!r}")
    header = {"t": msg.TYPE, "v": PROTOCOL_VERSION, "f": _to_plain(msg)}
    return [msgpack.packb(header, use_bin_type=True), *payload]


def _to_plain(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = _to_plain(value) if isinstance(value, KVLayout) else value
    return out


def _buffer(frame) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes its bytes as .buffer
    try:
        return memoryview(buf).cast("B")
    except TypeError as e:
        raise WireError(f"frame is not a buffer: {type(frame).__name__}") from e


def decode(frames) -> tuple[object, list[memoryview]]:
    """(message, payload frames) from received frames; WireError if malformed."""
    if not frames:
        raise WireError("no frames")
    head = _buffer(frames[0])
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        obj = msgpack.unpackb(
            head,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_STR,
            max_bin_len=0,
            max_array_len=MAX_LIST,
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several unrelated types
        raise WireError(f"header is not valid msgpack: {e}") from None
    if not isinstance(obj, dict) or set(obj) != {"t", "v", "f"}:
        raise WireError("header must be a map with keys t, v, f")
    if obj["v"] != PROTOCOL_VERSION:
        raise WireError(f"protocol version {obj['v']!r} is not {PROTOCOL_VERSION}")
    cls = MESSAGES.get(obj["t"]) if isinstance(obj["t"], str) else None
    if cls is None:
        raise WireError(f"unknown message type {obj['t']!r}")
    msg = _build(cls, obj["f"])
    payload = [_buffer(f) for f in frames[1:]]
    _check_payload(msg, payload)
    return msg, payload


def _check_payload(msg, payload: list[memoryview]) -> None:
    if not isinstance(msg, KVChunk):
        if payload:
            raise WireError(f"{msg.TYPE} carries no payload, got {len(payload)} frames")
        return
    if not 0 < msg.num_blocks <= MAX_PAYLOAD_FRAMES or len(payload) != msg.num_blocks:
        raise WireError(f"kv_chunk announces {msg.num_blocks} blocks, got {len(payload)} frames")
    if not 0 < msg.nbytes <= MAX_PAYLOAD_BYTES or sum(len(p) for p in payload) != msg.nbytes:
        raise WireError(f"kv_chunk payload size differs from nbytes={msg.nbytes}")
    if msg.first_block < 0 or msg.checksum < 0:
        raise WireError("kv_chunk first_block and checksum must be non-negative")


@cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _build(cls, fields):
    if not isinstance(fields, dict):
        raise WireError(f"{cls.__name__}: fields must be a map")
    names = [f.name for f in dataclasses.fields(cls)]
    if set(fields) != set(names):
        missing, extra = set(names) - set(fields), set(fields) - set(names)
        raise WireError(f"{cls.__name__}: missing {sorted(missing)}, unexpected {sorted(extra)}")
    hints = _hints(cls)
    values = {}
    for name in names:
        values[name] = _check(f"{cls.__name__}.{name}", hints[name], fields[name])
    return cls(**values)


def _check(where: str, tp, value):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
        options = [t for t in typing.get_args(tp) if t is not type(None)]
        return _check(where, options[0], value)
    if tp is KVLayout:
        return _build(KVLayout, value)
    if tp is bool:
        if not isinstance(value, bool):
            raise WireError(f"{where}: expected bool, got {type(value).__name__}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise WireError(f"{where}: expected int, got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WireError(f"{where}: expected float, got {type(value).__name__}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise WireError(f"{where}: expected str, got {type(value).__name__}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise WireError(f"{where}: expected map, got {type(value).__name__}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise WireError(f"{where}: expected list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if args:
            return [_check(f"{where}[]", args[0], v) for v in value]
        return value
    raise WireError(f"{where}: unsupported annotation {tp!r}")  # a bug in messages.py
