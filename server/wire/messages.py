"""Every message that crosses a process boundary: frozen dataclasses of msgpack-native fields,
built with keywords only (a field added or moved never shifts another's value silently).

No torch, no zmq. `codec` checks each received field against these annotations first; the
`__post_init__` checks below then hold the few value invariants, on both ends of the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

# bytes per element of each KV dtype the wire knows (torch names)
DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2}
ROLES = ("prefill", "decode", "both")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _non_negative(obj, *names: str) -> None:
    for name in names:
        _require(getattr(obj, name) >= 0, f"{name} must be non-negative, got {getattr(obj, name)}")


def _check_token_ids(name: str, ids: list[int]) -> None:
    _require(not ids or min(ids) >= 0, f"{name} must be non-negative token ids")


def _check_logprob_entry(where: str, entry) -> None:
    """One generated token: [token_id, logprob, [[token_id, logprob], ...]]."""

    def is_pair(x) -> bool:
        return (
            isinstance(x, list)
            and len(x) == 2
            and type(x[0]) is int
            and isinstance(x[1], int | float)
            and not isinstance(x[1], bool)
        )

    _require(
        isinstance(entry, list)
        and len(entry) == 3
        and is_pair(entry[:2])
        and isinstance(entry[2], list)
        and all(is_pair(x) for x in entry[2]),
        f"{where} must be [token_id, logprob, [[token_id, logprob], ...]]",
    )


@dataclass(frozen=True, kw_only=True)
class KVLayout:
    """What a KV block holds; two workers hand KV over only when their layouts are equal."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32", "float16" or "bfloat16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            _require(getattr(self, name) >= 1, f"{name} must be positive")
        _require(self.dtype in DTYPE_SIZES, f"unknown KV dtype {self.dtype!r}")


@dataclass(frozen=True, kw_only=True)
class WorkerCPU:
    """How a worker runs on its CPU (see cpu_threads and cpu_linear_plan)."""

    threads: int
    wait_policy: str
    cpus: str  # the cores it may run on, "0-3,6"
    linear: str  # the float32 CPU linear plan it runs; "" where none (not float32 on CPU)

    def __post_init__(self) -> None:
        _require(self.threads >= 1, f"threads must be positive, got {self.threads}")


@dataclass(frozen=True, kw_only=True)
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
    cpu: WorkerCPU | None = None  # None: not a CPU worker

    def __post_init__(self) -> None:
        _require(self.role in ROLES, f"role must be one of {ROLES}, got {self.role!r}")
        _non_negative(self, "pid", "max_model_len", "num_blocks")


@dataclass(frozen=True, kw_only=True)
class RegisterReply:
    TYPE: ClassVar[str] = "register_reply"
    accepted: bool
    reason: str


@dataclass(frozen=True, kw_only=True)
class Heartbeat:
    TYPE: ClassVar[str] = "heartbeat"
    worker_id: str
    running: int
    waiting: int
    kv_usage: float
    num_free_blocks: int
    prefix_queries: int
    prefix_hits: int
    draining: bool = False  # stopping: finishes what it has, takes nothing new
    rss_bytes: int = 0  # the worker process's resident memory
    kv_resident_bytes: int = 0  # of its KV cache, what is resident (all of it, once written)

    def __post_init__(self) -> None:
        _non_negative(
            self, "running", "waiting", "num_free_blocks", "prefix_queries", "prefix_hits",
            "rss_bytes", "kv_resident_bytes",
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Deregister:
    """Worker -> router, as a worker leaves on purpose (drained, or stopped)."""

    TYPE: ClassVar[str] = "deregister"
    worker_id: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Reconnect:
    """Router -> worker it does not know (the router restarted): register again."""

    TYPE: ClassVar[str] = "reconnect"
    reason: str


@dataclass(frozen=True, kw_only=True)
class Generate:
    TYPE: ClassVar[str] = "generate"
    request_id: str
    prompt_token_ids: list[int]
    params: dict  # params_to_dict(SamplingParams)
    decode_worker_id: str  # "" when the same worker decodes (colocated)
    decode_endpoint: str
    # A request resumed after a failure: the tokens it had already streamed (recomputed here).
    prior_output_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_token_ids("prompt_token_ids", self.prompt_token_ids)
        _check_token_ids("prior_output_ids", self.prior_output_ids)
        _require(
            not (self.prior_output_ids and self.decode_endpoint),
            "a resumed request is recomputed where it decodes, never handed off",
        )


@dataclass(frozen=True, kw_only=True)
class Abort:
    TYPE: ClassVar[str] = "abort"
    request_id: str


@dataclass(frozen=True, kw_only=True)
class TokenOutput:
    TYPE: ClassVar[str] = "token_output"
    request_id: str
    worker_id: str
    token_ids: list[int]
    logprobs: list | None  # one [token_id, logprob, [[tid, lp], ...]] per token
    finish_reason: str | None
    stop_reason: int | None
    num_cached_tokens: int
    queue_time_s: float | None = None  # on a request's first output from the worker that ran it

    def __post_init__(self) -> None:
        _check_token_ids("token_ids", self.token_ids)
        _non_negative(self, "num_cached_tokens")
        _require(self.queue_time_s is None or self.queue_time_s >= 0, "queue_time_s >= 0")
        if self.logprobs is not None:
            for entry in self.logprobs:
                _check_logprob_entry("each logprobs entry", entry)


@dataclass(frozen=True, kw_only=True)
class RequestFailed:
    """Worker -> router: the request ended here without finishing; nothing more comes for it."""

    TYPE: ClassVar[str] = "request_failed"
    request_id: str
    worker_id: str
    error: str
    # The failure was this worker's (draining, a handoff that failed), not the request's, so the
    # router may run it elsewhere.
    retry: bool
    # The request itself is invalid (a constraint the grammar library refuses): the client gets
    # a 400 with `error`, which starts with the field's name.
    bad_request: bool = False


@dataclass(frozen=True, kw_only=True)
class KVOpen:
    TYPE: ClassVar[str] = "kv_open"
    request_id: str
    prefill_worker_id: str
    prompt_token_ids: list[int]
    params: dict
    layout: KVLayout

    def __post_init__(self) -> None:
        _check_token_ids("prompt_token_ids", self.prompt_token_ids)


@dataclass(frozen=True, kw_only=True)
class KVOpenReply:
    TYPE: ClassVar[str] = "kv_open_reply"
    request_id: str
    ok: bool
    reason: str
    cached_blocks: int = 0  # leading blocks the decode worker holds already: not to be shipped

    def __post_init__(self) -> None:
        _non_negative(self, "cached_blocks")


@dataclass(frozen=True, kw_only=True)
class KVChunk:
    """Blocks `first_block ...` of a handoff; followed by exactly `num_blocks` payload frames of
    one block each (block_shape = cache.shape[1:] = [layers, 2, block_size, kv_heads, head_dim])."""

    TYPE: ClassVar[str] = "kv_chunk"
    request_id: str
    first_block: int
    num_blocks: int
    block_shape: list[int]
    dtype: str
    nbytes: int
    checksum: int  # frames_checksum of the payload: XXH3-64 over the frames in order

    def __post_init__(self) -> None:
        _non_negative(self, "first_block")
        _require(self.num_blocks >= 1, f"num_blocks must be positive, got {self.num_blocks}")
        _require(
            len(self.block_shape) == 5 and min(self.block_shape) >= 1 and self.block_shape[1] == 2,
            f"block_shape must be [layers, 2, block_size, kv_heads, head_dim], "
            f"got {self.block_shape}",
        )
        _require(self.dtype in DTYPE_SIZES, f"unknown KV dtype {self.dtype!r}")
        _require(
            self.nbytes == self.num_blocks * self.block_nbytes,
            f"nbytes={self.nbytes} is not {self.num_blocks} blocks of {self.block_nbytes} bytes",
        )
        _require(0 <= self.checksum < 1 << 64, f"checksum {self.checksum} is not a 64-bit hash")

    @property
    def block_nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.block_shape:
            n *= d
        return n


@dataclass(frozen=True, kw_only=True)
class KVDone:
    TYPE: ClassVar[str] = "kv_done"
    request_id: str
    num_blocks: int
    first_token: int
    first_logprobs: list | None  # [token_id, logprob, [[tid, lp], ...]] of the first token
    num_cached_tokens: int

    def __post_init__(self) -> None:
        _non_negative(self, "num_blocks", "first_token", "num_cached_tokens")
        if self.first_logprobs is not None:
            _check_logprob_entry("first_logprobs", self.first_logprobs)


@dataclass(frozen=True, kw_only=True)
class KVAck:
    TYPE: ClassVar[str] = "kv_ack"
    request_id: str
    ok: bool
    reason: str


@dataclass(frozen=True, kw_only=True)
class KVAbort:
    TYPE: ClassVar[str] = "kv_abort"
    request_id: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class KVReport:
    """Prefill worker -> router, once a handoff has ended: what it moved and how long it took."""

    TYPE: ClassVar[str] = "kv_report"
    request_id: str
    nbytes: int
    seconds: float
    ok: bool
    skipped_nbytes: int = 0  # KV the decode worker held already, so not sent

    def __post_init__(self) -> None:
        _non_negative(self, "nbytes", "seconds", "skipped_nbytes")


@dataclass(frozen=True, kw_only=True)
class KVEvents:
    """Worker -> router: prefix-cache blocks that became findable (`stored`) or stopped being
    (`removed`), as keys (see baton.scheduler.kv_index). `seq` numbers the batches; `reset`
    starts a snapshot (what the router knew of this worker is dropped first)."""

    TYPE: ClassVar[str] = "kv_events"
    worker_id: str
    seq: int
    reset: bool
    stored: list[int]
    removed: list[int]

    def __post_init__(self) -> None:
        _non_negative(self, "seq")
        _check_token_ids("stored", self.stored)
        _check_token_ids("removed", self.removed)


@dataclass(frozen=True, kw_only=True)
class KVResync:
    """Router -> worker: the router lost track of its KV events; send a snapshot."""

    TYPE: ClassVar[str] = "kv_resync"
    reason: str


MESSAGES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (
        Register,
        RegisterReply,
        Heartbeat,
        Deregister,
        Reconnect,
        Generate,
        Abort,
        TokenOutput,
        RequestFailed,
        KVOpen,
        KVOpenReply,
        KVChunk,
        KVDone,
        KVAck,
        KVAbort,
        KVReport,
        KVEvents,
        KVResync,
    )
}
