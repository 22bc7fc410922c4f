"""Neox-style rotary embedding (rotate_half) of q and k from fp32 cos/sin caches.

Every rope type (default, linear, llama3) differs only in the cache contents, so one kernel serves
all of them. One program per token rotates all its q and k heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.launch import Launch
from baton.kernels.utils import check_runnable, next_pow2


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr, s_h, s_oh, n_heads, cos, sin, HALF, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr
):
    # x_ptr, o_ptr: this token's row; cos, sin: [1, BLOCK_D] fp32
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < HALF)
    x1 = tl.load(x_ptr + h * s_h + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + h * s_h + HALF + d, mask=mask, other=0.0).to(tl.float32)
    dtype = o_ptr.dtype.element_ty
    tl.store(o_ptr + h * s_oh + d, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(o_ptr + h * s_oh + HALF + d, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cos_ptr, sin_ptr,
    sq_t, sq_h, sk_t, sk_h, sqo_t, sqo_h, sko_t, sko_h, s_cache,
    n_q, n_k, HALF,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, BLOCK_D)[None, :]
    cos = tl.load(cos_ptr + pos * s_cache + d, mask=d < HALF, other=0.0)
    sin = tl.load(sin_ptr + pos * s_cache + d, mask=d < HALF, other=0.0)
    _rotate_heads(
        q_ptr + t * sq_t, qo_ptr + t * sqo_t, sq_h, sqo_h, n_q, cos, sin, HALF, BLOCK_HQ, BLOCK_D
    )
    _rotate_heads(
        k_ptr + t * sk_t, ko_ptr + t * sko_t, sk_h, sko_h, n_k, cos, sin, HALF, BLOCK_HK, BLOCK_D
    )


def _check(q, k, positions, cos_cache, sin_cache) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q must be [T, H, D] and k [T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    T, _, D = q.shape
    if (
        D % 2
        or cos_cache.dim() != 2
        or cos_cache.shape[1] != D // 2
        or cos_cache.shape != sin_cache.shape
    ):
        raise ValueError(
            f"cos_cache and sin_cache must be [P, {D // 2}] for an even head dim {D}, "
            f"got {tuple(cos_cache.shape)} and {tuple(sin_cache.shape)}"
        )
    if positions.shape != (T,) or positions.dtype != torch.int64:
        raise ValueError(
            f"positions must be [{T}] int64, got {tuple(positions.shape)} {positions.dtype}"
        )
    if cos_cache.dtype != torch.float32 or sin_cache.dtype != torch.float32:
        raise ValueError(
            f"cos/sin caches must be float32, got {cos_cache.dtype}, {sin_cache.dtype}"
        )
    if q.dtype != k.dtype or not q.is_floating_point():
        raise ValueError(f"q and k must share a float dtype, got {q.dtype} and {k.dtype}")
    if (
        q.stride(2) != 1
        or k.stride(2) != 1
        or not (cos_cache.is_contiguous() and sin_cache.is_contiguous())
    ):
        raise ValueError("q and k need a contiguous last dim, and the caches must be contiguous")
    if len({t.device for t in (q, k, positions, cos_cache, sin_cache)}) != 1:
        raise ValueError("q, k, positions and the caches must be on one device")


def apply_rotary(q, k, positions, cos_cache, sin_cache) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [T, H, D], k: [T, Hkv, D] (may be strided views of a qkv projection); positions: [T];
    # cos_cache, sin_cache: [P, D/2] fp32 -> new contiguous (q, k)
    # NOTE: positions are not bounds-checked against P: that would sync the device.
    _check(q, k, positions, cos_cache, sin_cache)
    check_runnable(q)
    q_out, k_out = q.new_empty(q.shape), k.new_empty(k.shape)
    T, H, D = q.shape
    if T == 0:
        return q_out, k_out
    plan_rotary(q, k, q_out, k_out, positions, cos_cache, sin_cache).run()
    return q_out, k_out


def plan_rotary(q, k, q_out, k_out, positions, cos_cache, sin_cache) -> Launch:
    T, H, D = q.shape
    block_d = next_pow2(D // 2)
    return Launch(
        _rotary_kernel,
        (T,),
        (
            q,
            k,
            q_out,
            k_out,
            positions,
            cos_cache,
            sin_cache,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            cos_cache.stride(0),
            H,
            k.shape[1],
            D // 2,
        ),  # fmt: skip
        dict(BLOCK_HQ=next_pow2(H), BLOCK_HK=next_pow2(k.shape[1]), BLOCK_D=block_d),
        4 if next_pow2(H) * block_d >= 2048 else 1,
    )


def apply_rotary_ref(q, k, positions, cos_cache, sin_cache) -> tuple[torch.Tensor, torch.Tensor]:
    # fp32 throughout, one rounding on the way out (the kernel's arithmetic)
    cos, sin = cos_cache[positions][:, None, :], sin_cache[positions][:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)
