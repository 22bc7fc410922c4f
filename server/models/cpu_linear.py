"""Float32 CPU matmuls over weights packed once for MKL's GEMM.

A plain float32 `F.linear` on CPU reformats (packs) the weight inside every call; a decode step
of a small model at a few dozen rows spends much of its time there. Packing each weight once at
load (`cblas_sgemm_pack`, through torch's `mkl::_mkl_reorder_linear_weight`) and multiplying
with `cblas_sgemm_compute` made a step's linears 1.2-1.6x faster at 4..64 rows on a 2-core Xeon
(20.3 vs 20.7 ms at 1 row, 67.5 vs 91.0 at 64; the same from 128 rows up). The packed copy
replaces the weight, so no memory is doubled (see `PackedWeight`).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys

import torch
import torch.nn.functional as F

PACK_ROWS = 64  # the row count MKL tunes the packed layout for (any row count may use it)


def _probe() -> bool:
    """Whether this torch build packs float32 weights for MKL and the packed product agrees with
    F.linear at every row count.

    NOTE: torch's op takes the packed path only when the input's row count equals the number it
    is given, and we give it the input's own, so a weight packed for PACK_ROWS serves every row
    count. MKL's packed layout of B does not depend on the rows of A; this checks it on load.
    """
    op = getattr(torch.ops, "mkl", None)
    if op is None or not hasattr(op, "_mkl_linear") or not torch.backends.mkl.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w, b = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
        packed = PackedWeight(w, b)
        for rows in (1, 3, 17, PACK_ROWS, 3 * PACK_ROWS + 5):
            x = torch.randn(rows, 24, generator=gen)
            if not torch.allclose(packed(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5):
                return False
    except RuntimeError:
        return False
    return True


class PackedWeight:
    """A float32 CPU weight (and bias) packed for MKL: `packed(x)` is `F.linear(x, w, b)`.

    NOTE: torch's op wants the original weight only for its shape and type (read when the row
    count differs from the one passed, which never happens here), so a zero-stride tensor of
    the right shape stands in for it and the original can be freed.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError("PackedWeight takes a 2-D float32 CPU weight")
        w = weight.detach().contiguous()
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(w, PACK_ROWS)
        self.shape_only = torch.empty((), dtype=w.dtype).expand(w.shape)
        self.bias = None if bias is None else bias.detach().contiguous()
        self.in_features = w.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"packed linear takes float32 [..., {self.in_features}], got {x.dtype} "
                f"{tuple(x.shape)}"
            )
        rows = x.numel() // self.in_features  # how torch's op counts them
        return torch.ops.mkl._mkl_linear(x, self.packed, self.shape_only, self.bias, rows)


MKL_PACKED = _probe()


def can_pack(weight: torch.Tensor) -> bool:
    return MKL_PACKED and weight.dtype == torch.float32 and weight.device.type == "cpu"


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc; elsewhere a no-op).

    NOTE: the weights that packing frees stay in the heap, which MKL's packed buffers do not
    reuse: without this a worker's RSS kept both copies (+520 MiB for smollm2 in float32).
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(AttributeError, OSError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)
