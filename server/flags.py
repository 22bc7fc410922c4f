"""The flags that more than one `baton` command takes, each declared once.

`baton serve` starts its workers with the command line of its own values of every flag a worker
takes (`forward`), so a worker it spawns runs with the same flags by construction. A flag that
sets an EngineConfig field names it, and takes its default from there unless it has its own.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from baton.server.config import DTYPES, LOAD_FORMATS, EngineConfig
from baton.server.cpu_threads import WAIT_POLICIES

_ENGINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}


@dataclass(frozen=True)
class Flag:
    name: str  # "--max-num-seqs"
    kwargs: dict[str, Any] = field(default_factory=dict)  # argparse's: type, choices, help ...
    config_field: str | None = None  # the EngineConfig field it sets (None: read elsewhere)
    to_config: Callable[[Any], Any] | None = None  # the flag's value -> the field's

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kw = dict(self.kwargs)
        if self.config_field is not None and "default" not in kw and "action" not in kw:
            kw["default"] = _ENGINE_DEFAULTS[self.config_field]
        parser.add_argument(self.name, **kw)

    def argv(self, value: Any) -> list[str]:
        """The command line that gives `value` back: none for None or a switch left off."""
        if value is None or value is False:
            return []
        return [self.name] if value is True else [self.name, str(value)]


# The model (router, serve, worker).
MODEL_FLAGS = (
    Flag("--model", {"help": "alias, HF folder, .gguf or config"}, "model"),
    Flag("--load-format", {"choices": LOAD_FORMATS}, "load_format"),
    Flag("--max-model-len", {"type": int}, "max_model_len"),
    Flag("--block-size", {"type": int}, "block_size"),
)

# How a worker runs the model (serve, worker).
ENGINE_FLAGS = (
    Flag("--device", {"help": "cpu or cuda (default: cuda when present)"}, "device"),
    Flag("--dtype", {"choices": DTYPES}, "dtype"),
    Flag("--kv-cache-gib", {"type": float, "help": "KV cache size on CPU"}, "kv_cache_gib"),
    # NOTE: None: the workers on one device share 0.85 of it (see launch._engine_config).
    Flag("--gpu-memory-utilization", {"type": float, "default": None}, "gpu_memory_utilization"),
    Flag("--max-num-seqs", {"type": int}, "max_num_seqs"),
    Flag("--max-num-batched-tokens", {"type": int}, "max_num_batched_tokens"),
    Flag("--seed", {"type": int}, "seed"),
    Flag(
        "--attention-backend",
        {
            "default": "auto",
            "choices": ["auto", "torch", "triton"],
            "help": "auto: triton on CUDA, torch on CPU",
        },
        "attention_backend",
        lambda v: None if v == "auto" else v,
    ),
    Flag(
        "--enforce-eager",
        {"action": "store_true", "help": "CUDA: no CUDA graphs for decode steps"},
        "cuda_graphs",
        lambda v: not v,
    ),
    Flag(
        "--cpu-linear",
        {
            "help": "float32 CPU linears: auto (timed once per host and cached), or a plan such "
            "as mkl-packed or dense@1,mkl-packed@3 (kernels: dense, onednn, mkl-packed, "
            "onednn-packed)"
        },
        "cpu_linear",
    ),
    Flag(
        "--threads",
        {
            "type": int,
            "default": None,
            "help": "CPU threads per worker (default: one per core the worker may use, within "
            "the cgroup's CPU quota; $OMP_NUM_THREADS if set)",
        },
    ),
    Flag(
        "--thread-wait-policy",
        {
            "default": "auto",
            "choices": WAIT_POLICIES,
            "help": "how a CPU thread with nothing to do waits: brief (spin ~the gap between two "
            "parallel regions, then sleep), passive (sleep at once), active (spin); auto: brief, "
            "or what $OMP_WAIT_POLICY / $GOMP_SPINCOUNT say",
        },
    ),
    Flag(
        "--cpus",
        {
            "default": None,
            "help": "pin each worker to these cores, e.g. 0-3,6 (default: the cores it was given)",
        },
    ),
)

# How a worker stops (serve, worker).
WORKER_FLAGS = (
    Flag(
        "--drain-timeout",
        {"type": float, "default": 30.0, "help": "SIGTERM: seconds a worker has to finish"},
    ),
    Flag(
        "--kv-timeout",
        {"type": float, "default": 60.0, "help": "seconds a stalled KV handoff is kept"},
    ),
)

# Every ZeroMQ link (router, serve, worker).
SECURITY_FLAGS = (
    Flag(
        "--curve-key-file",
        {
            "default": None,
            "help": "CURVE-secure every ZeroMQ link with this secret key file (see `baton keys`); "
            "default: $BATON_CURVE_SECRET_KEY_FILE, or the key pair in $BATON_CURVE_PUBLIC_KEY "
            "and $BATON_CURVE_SECRET_KEY; none: plain links",
        },
    ),
)

# What `baton serve` hands to each worker it starts.
FORWARDED = MODEL_FLAGS + ENGINE_FLAGS + WORKER_FLAGS + SECURITY_FLAGS


def add_flags(parser: argparse.ArgumentParser, flags: Iterable[Flag]) -> None:
    for f in flags:
        f.add_to(parser)


def forward(flags: Iterable[Flag], values: Mapping[str, Any]) -> list[str]:
    """The command line that gives a parser with `flags` these values (by dest)."""
    return [arg for f in flags for arg in f.argv(values[f.dest])]


def engine_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields the parsed flags set."""
    out = {}
    for f in MODEL_FLAGS + ENGINE_FLAGS:
        if f.config_field is not None:
            value = getattr(args, f.dest)
            out[f.config_field] = value if f.to_config is None else f.to_config(value)
    return out
