"""What every kernel launcher shares: interpreter detection and small launch heuristics."""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True under the Triton interpreter (kernels then upcast tiles to fp32: its bf16 is broken)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; a small fixed number off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def check_runnable(t: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU ones only under the interpreter."""
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"Triton kernels need a CUDA tensor (got {t.device}); on CPU set TRITON_INTERPRET=1 "
            "before importing baton.kernels (slow: for tests)"
        )
