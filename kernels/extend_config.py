"""Launch configs of the extend kernel: tiles per GPU, fitted to the dtype's shared memory.

Kept beside the kernel's launcher (which imports `launch_config`); the compile check and the
start-up warm-up read `query_buckets` to compile every config a step can reach.
"""

from __future__ import annotations

import torch

from baton.kernels.launch import Arch, shared_memory_limit
from baton.kernels.utils import next_pow2

SHARED_SLACK = 8 << 10  # room for the layout conversions Triton adds beside the tiles


# Hopper-class tiles assume 2-byte types; `_fit` shrinks them for wider ones (and smaller GPUs).
def _base_tiles(arch: Arch, head_dim: int) -> tuple[int, int, int, int]:
    if head_dim > 128:
        return 64, 32, 4, 2
    if head_dim > 64 and arch == (9, 0):
        return 128, 64, 8, 3  # bf16: Q 32 KiB + 3 stages of K and V at 32 KiB: 128 KiB
    if head_dim > 64 and arch == (8, 0):
        return 128, 64, 8, 2
    if head_dim > 64:
        return 64, 64, 4, 2
    return 128, 64, 4, 3


def shared_bytes(block_m: int, block_n: int, stages: int, head_dim: int, itemsize: int) -> int:
    """What the kernel keeps in shared memory: the Q tile, and K and V tiles per stage (as
    Triton's pipeliner lays them out; the compile check holds this estimate to the real one)."""
    return (block_m + 2 * stages * block_n) * head_dim * itemsize


def _fit(tiles, head_dim: int, itemsize: int, limit: int) -> tuple[int, int, int, int]:
    """Fewer stages, then narrower K tiles, then shorter Q tiles, until the tiles fit `limit`
    less SHARED_SLACK (room for the layout conversions Triton adds)."""
    block_m, block_n, warps, stages = tiles
    while shared_bytes(block_m, block_n, stages, head_dim, itemsize) > limit - SHARED_SLACK:
        if stages > 2:
            stages -= 1
        elif block_n > 32:
            block_n //= 2
        elif stages > 1:
            stages -= 1
        elif block_m > 16:
            block_m //= 2
            block_n = min(block_n, block_m)
        else:
            break
    return block_m, block_n, warps, stages


def launch_config(
    arch: Arch, dtype: torch.dtype, head_dim: int, max_query_len: int
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU of compute capability `arch` (None:
    the interpreter). NOTE: BLOCK_M % BLOCK_N == 0 is required."""
    if arch is None:
        # Small tiles keep interpreted tests fast; BLOCK_M > BLOCK_N still covers the path where
        # the diagonal spans several key tiles.
        block_m, block_n, warps, stages = 32, 16, 4, 1
        return min(block_m, max(16, next_pow2(max_query_len))), block_n, warps, stages
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_m, block_n, warps, stages = _fit(
        _base_tiles(arch, head_dim), head_dim, itemsize, shared_memory_limit(arch)
    )
    # Short queries (decode-like steps) would leave most of a 128-row tile idle.
    block_m = max(16, min(block_m, next_pow2(max_query_len)))
    block_n = min(block_n, block_m)
    if block_m < 64:
        warps = 4
    return block_m, block_n, warps, stages


def query_buckets(arch: Arch, dtype: torch.dtype, head_dim: int) -> list[int]:
    """One longest-query length per distinct launch config: the variants a server compiles at
    start (and the compile check compiles), so no prefill length compiles one later."""
    seen, lens = set(), []
    for n in (16, 32, 64, 128, 256):
        cfg = launch_config(arch, dtype, head_dim, n)
        if cfg not in seen:
            seen.add(cfg)
            lens.append(n)
    return lens
