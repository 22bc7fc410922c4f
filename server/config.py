"""Engine configuration: one frozen dataclass built at the edge and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from baton.scheduler.config import CacheConfig, SchedulerConfig
from baton.server.wire.messages import DTYPE_SIZES

DTYPES = ("auto", *DTYPE_SIZES)
LOAD_FORMATS = ("auto", "dummy")
DEFAULT_MAX_MODEL_LEN_CAP = 8192


def cache_root() -> Path:
    """Where Baton keeps what it computes once per host: converted models, measured plans."""
    return Path(os.environ.get("BATON_CACHE_DIR") or "~/.cache/baton").expanduser()


def resolve_max_model_len(requested: int | None, model_max: int) -> int:
    """The context length to serve: the model's, capped by default; never past the model's."""
    if requested is None:
        return min(model_max, DEFAULT_MAX_MODEL_LEN_CAP)
    if requested > model_max:
        raise ValueError(
            f"max_model_len: {requested} exceeds the model's max_position_embeddings ({model_max})"
        )
    return requested


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2"
    load_format: str = "auto"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str | None = None  # None: cuda when available, else cpu
    seed: int = 0
    attention_backend: str | None = None  # None: the device's default
    # CUDA with the triton backend: replay decode steps from CUDA graphs (False: always eager).
    cuda_graphs: bool = True
    block_size: int = 16
    kv_cache_gib: float = 1.0  # CPU budget for the KV cache
    gpu_memory_utilization: float = 0.85  # CUDA: fraction of the device the process may fill
    num_kv_blocks: int | None = None  # overrides both budgets (tests, benchmarks)
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped at 8192
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # float32 CPU linears: "auto" (measured once per host, see cpu_linear_plan) or a pinned plan
    cpu_linear: str = "auto"
    show_progress: bool = True
    # Workers behind a router leave text (and stop strings) to the router.
    detokenize: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {DTYPES}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"load_format: must be one of {LOAD_FORMATS}, got {self.load_format!r}"
            )
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device: must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib: must be positive, got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be positive, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len: must be positive, got {self.max_model_len}")


def scheduler_configs(
    config: EngineConfig, max_model_len: int, num_blocks: int
) -> tuple[CacheConfig, SchedulerConfig]:
    """The batcher's configs for an engine: without chunked prefill a step's token budget must
    hold the longest prompt."""
    budget = config.max_num_batched_tokens
    if not config.enable_chunked_prefill:
        budget = max(budget, max_model_len)
    cache = CacheConfig(
        num_blocks=num_blocks,
        block_size=config.block_size,
        enable_prefix_caching=config.enable_prefix_caching,
    )
    sched = SchedulerConfig(
        max_num_batched_tokens=budget,
        max_num_seqs=config.max_num_seqs,
        max_model_len=max_model_len,
        enable_chunked_prefill=config.enable_chunked_prefill,
    )
    return cache, sched
