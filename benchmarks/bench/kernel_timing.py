"""Timing for the kernel benchmarks (benchmarks/kernels.py): medians over rotated inputs, the
device's own ceilings, the target each section is held to, and a profiler trace of a case that
misses it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

L2_FALLBACK = 60 << 20  # an H100/H200's L2, where the device does not say


def bench(fn: Callable, rotate: list | None = None) -> float:
    """Median seconds of fn(*args) over argument sets taken in turn (so none sits in L2)."""
    import triton.testing

    sets = rotate or [()]
    i = [0]

    def call():
        fn(*sets[i[0] % len(sets)])
        i[0] += 1

    return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median") / 1e3


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "L2_cache_size", 0) or L2_FALLBACK


def rotations(nbytes: int, l2: int, most: int = 64) -> int:
    """Input sets to take in turn so each call reads from HBM: together at least 4x the L2."""
    return max(1, min(most, -(-4 * l2 // max(1, nbytes))))


def ceilings(dtype: torch.dtype) -> dict:
    """A 1 GiB device-to-device copy (read + write bytes / time) and an 8192^3 matmul."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    t_copy = bench(torch.Tensor.copy_, rotate=[(torch.empty_like(src), src)])
    del src
    a = torch.randn(8192, 8192, dtype=dtype, device="cuda")
    b = torch.randn(8192, 8192, dtype=dtype, device="cuda")
    t_mm = bench(torch.matmul, rotate=[(a, b)])
    del a, b
    out = {"copy_gbps": 2 * n / t_copy / 1e9, "matmul_tflops": 2 * 8192**3 / t_mm / 1e12}
    print(f"ceilings: copy {out['copy_gbps']:.0f} GB/s, matmul {out['matmul_tflops']:.0f} TF/s")
    return out


def save_trace(fn: Callable, path: Path) -> str:
    """A chrome trace (CPU and CUDA) of one call of fn, after one untraced call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return str(path)


@dataclass
class Target:
    """A section's goal at one case; `met` stays None while that case is not measured."""

    rule: str
    case: dict
    met: bool | None = None
    got: dict = field(default_factory=dict)
    trace: str | None = None
    trace_error: str | None = None

    def record(self, met: bool, got: dict, run_once: Callable, trace_path: Path) -> None:
        """The case's result; a miss leaves a profiler trace of `run_once` at trace_path."""
        self.met, self.got = bool(met), got
        if self.met:
            return
        try:
            self.trace = save_trace(run_once, trace_path)
        except Exception as e:  # the trace is a help, never a reason to lose the results
            self.trace_error = f"{type(e).__name__}: {e}"[:300]
