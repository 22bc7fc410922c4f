"""Float32 CPU linear kernels: `F.linear` as torch runs it, and the forms worth choosing instead.

| kernel | weight kept as | what runs |
| --- | --- | --- |
| `dense` | the weight | `F.linear` (MKL's sgemm in the CPU wheels) |
| `onednn` | the weight | oneDNN's inner product (`mkldnn::_linear_pointwise`) |
| `mkl-packed` | MKL's packed copy | `cblas_sgemm_compute` (`mkl::_mkl_linear`) |
| `onednn-packed` | oneDNN's blocked copy | oneDNN's inner product on it |

A plain `F.linear` reformats (packs) the weight inside every call; a packed copy made once at
load skips that. Which is fastest depends on the host: on a 2-core Xeon, MKL's packed GEMM ran a
smollm2 step's linears 1.2-1.6x faster at 4..64 rows; on a 2-core EPYC (AVX2) it was slower
than `F.linear` at 16 rows. `cpu_linear_plan` measures them per host and row count.
A packed copy replaces the weight, so no memory is doubled unless a plan needs two forms.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

PACK_ROWS = 64  # the row count the packed layouts are tuned for (any row count may use them)

LinearFn = Callable[[torch.Tensor], torch.Tensor]


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError("a CPU linear kernel takes a 2-D float32 CPU weight")
    return weight.detach().contiguous()


def _check_input(x: torch.Tensor, in_features: int) -> None:
    if x.dtype != torch.float32 or x.shape[-1] != in_features:
        raise ValueError(
            f"packed linear takes float32 [..., {in_features}], got {x.dtype} {tuple(x.shape)}"
        )


class PackedWeight:
    """A float32 CPU weight (and bias) packed for MKL: `packed(x)` is `F.linear(x, w, b)`.

    NOTE: torch's op wants the original weight only for its shape and type (read when the row
    count differs from the one passed, which never happens here: we pass the input's own, and
    MKL's packed layout of B does not depend on the rows of A), so a zero-stride tensor of the
    right shape stands in for it and the original can be freed.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = _check_weight(weight)
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(w, PACK_ROWS)
        self.shape_only = torch.empty((), dtype=w.dtype).expand(w.shape)
        self.bias = None if bias is None else bias.detach().contiguous()
        self.in_features = w.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features)
        rows = x.numel() // self.in_features  # how torch's op counts them
        return torch.ops.mkl._mkl_linear(x, self.packed, self.shape_only, self.bias, rows)


class OneDNNWeight:
    """A float32 CPU weight in oneDNN's blocked layout (or as it is, `packed=False`), multiplied
    by oneDNN's inner product: `w(x)` is `F.linear(x, w, b)`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool) -> None:
        w = _check_weight(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS) if packed else w
        self.bias = None if bias is None else bias.detach().contiguous()
        self.in_features = w.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _dense(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearFn:
    return lambda x: F.linear(x, weight, bias)


# kernel -> (the form of the weight it keeps, how to build it from a weight and bias)
KERNELS: dict[str, tuple[str, Callable[[torch.Tensor, torch.Tensor | None], LinearFn]]] = {
    "dense": ("dense", _dense),
    "onednn": ("dense", lambda w, b: OneDNNWeight(w, b, packed=False)),
    "mkl-packed": ("mkl-packed", PackedWeight),
    "onednn-packed": ("onednn-packed", lambda w, b: OneDNNWeight(w, b, packed=True)),
}


def _agrees(build: Callable[[torch.Tensor, torch.Tensor | None], LinearFn]) -> bool:
    """Whether this torch build runs the kernel and it equals F.linear at every row count."""
    try:
        gen = torch.Generator().manual_seed(0)
        w, b = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
        fn = build(w, b)
        for rows in (1, 3, 17, PACK_ROWS, 3 * PACK_ROWS + 5):
            x = torch.randn(rows, 24, generator=gen)
            if not torch.allclose(fn(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5):
                return False
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


@functools.cache
def available() -> tuple[str, ...]:
    """The kernels this torch build runs: "dense" always, the others where it has them.
    Tried once, on first use: importing this module runs no matmul."""
    with torch.inference_mode():
        return tuple(name for name, (_, build) in KERNELS.items() if _agrees(build))


def is_cpu_float32(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.float32 and weight.device.type == "cpu"


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc; elsewhere a no-op).

    NOTE: the weights that packing frees stay in the heap, which the packed buffers do not
    reuse: without this a worker's RSS kept both copies (+520 MiB for smollm2 in float32).
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(AttributeError, OSError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


class PlannedLinear:
    """`F.linear(x, w, b)` through the kernel that `ranges` ((from rows, kernel), increasing
    from 1) names for x's row count; each kernel's form of the weight is built once, here."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ranges: tuple[tuple[int, str], ...],
    ) -> None:
        fns = {k: KERNELS[k][1](weight, bias) for k in dict.fromkeys(k for _, k in ranges)}
        self.ranges = [(start, fns[k]) for start, k in reversed(ranges)]  # the widest first
        self.in_features = weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        for start, fn in self.ranges[:-1]:
            if rows >= start:
                return fn(x)
        return self.ranges[-1][1](x)
