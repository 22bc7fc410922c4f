"""Every message that crosses a process boundary: frozen dataclasses of msgpack-native fields.

No torch, no zmq. `codec` encodes and decodes them, checking each field against these
annotations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from baton.scheduler.sampling_params import SamplingParams


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32", "float16" or "bfloat16"


@dataclass(frozen=True)
class Register:
    TYPE: ClassVar[str] = "register"
    worker_id: str
    role: str  # "prefill", "decode" or "both"
    pid: int
    host: str
    model: str
    layout: KVLayout
    kv_endpoint: str
    max_model_len: int
    num_blocks: int
    version: str


@dataclass(frozen=True)
class RegisterReply:
    TYPE: ClassVar[str] = "register_reply"
    accepted: bool
    reason: str


@dataclass(frozen=True)
class Heartbeat:
    TYPE: ClassVar[str] = "heartbeat"
    worker_id: str
    running: int
    waiting: int
    kv_usage: float
    num_free_blocks: int
    prefix_queries: int
    prefix_hits: int


@dataclass(frozen=True)
class Generate:
    TYPE: ClassVar[str] = "generate"
    request_id: str
    prompt_token_ids: list[int]
    params: dict
    decode_worker_id: str  # "" when the same worker decodes (colocated)
    decode_endpoint: str


@dataclass(frozen=True)
class Abort:
    TYPE: ClassVar[str] = "abort"
    request_id: str


@dataclass(frozen=True)
class TokenOutput:
    TYPE: ClassVar[str] = "token_output"
    request_id: str
    worker_id: str
    token_ids: list[int]
    logprobs: list | None  # one [token_id, logprob, [[tid, lp], ...]] per token
    finish_reason: str | None
    stop_reason: int | None
    num_cached_tokens: int
    error: str  # "" unless the request failed


@dataclass(frozen=True)
class KVOpen:
    TYPE: ClassVar[str] = "kv_open"
    request_id: str
    prefill_worker_id: str
    prompt_token_ids: list[int]
    params: dict
    layout: KVLayout


@dataclass(frozen=True)
class KVOpenReply:
    TYPE: ClassVar[str] = "kv_open_reply"
    request_id: str
    ok: bool
    reason: str


@dataclass(frozen=True)
class KVChunk:
    """Followed by exactly `num_blocks` payload frames, `nbytes` in total."""

    TYPE: ClassVar[str] = "kv_chunk"
    request_id: str
    first_block: int
    num_blocks: int
    block_shape: list[int]
    dtype: str
    nbytes: int
    checksum: int


@dataclass(frozen=True)
class KVDone:
    TYPE: ClassVar[str] = "kv_done"
    request_id: str
    num_blocks: int
    first_token: int
    first_logprobs: list | None
    num_cached_tokens: int


@dataclass(frozen=True)
class KVAck:
    TYPE: ClassVar[str] = "kv_ack"
    request_id: str
    ok: bool
    reason: str


@dataclass(frozen=True)
class KVAbort:
    TYPE: ClassVar[str] = "kv_abort"
    request_id: str
    reason: str


MESSAGES = {
    cls.TYPE: cls
    for cls in (
        Register,
        RegisterReply,
        Heartbeat,
        Generate,
        Abort,
        TokenOutput,
        KVOpen,
        KVOpenReply,
        KVChunk,
        KVDone,
        KVAck,
        KVAbort,
    )
}

_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams) if f.name != "extra"}


def params_to_dict(params: SamplingParams) -> dict:
    d = {name: getattr(params, name) for name in _PARAM_FIELDS}
    d["stop"] = list(params.stop)
    d["stop_token_ids"] = list(params.stop_token_ids)
    return d


def params_from_dict(d: dict) -> SamplingParams:
    """SamplingParams from the wire; ValueError (naming the field) on anything off."""
    if not isinstance(d, dict):
        raise ValueError("params: must be a map")
    unknown = set(d) - _PARAM_FIELDS
    if unknown:
        raise ValueError(f"params: unknown fields {sorted(unknown)}")
    for key in ("stop", "stop_token_ids"):
        if key in d and not isinstance(d[key], list):
            raise ValueError(f"{key}: must be a list")
    try:
        return SamplingParams(**d)
    except TypeError as e:  # a value of a type SamplingParams cannot even compare
        raise ValueError(f"params: {e}") from None
