"""Write new K/V rows into the paged cache at their slots (one program per token, all heads)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.launch import Launch
from baton.kernels.utils import check_runnable, next_pow2


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    sk_t, sk_h, sv_t, sv_h,
    skc_b, skc_o, skc_h, svc_b, svc_o, svc_h,
    n_heads, head_dim, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    block = slot // block_size
    off = slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    # NOTE: a negative slot is CUDA-graph padding: it gets no heads, so nothing is written. (Not
    # `mask & (slot >= 0)`: the interpreter turns a tensor & scalar-bool mask into int32 and fails.)
    heads = tl.where(slot >= 0, n_heads, 0)
    mask = (h < heads) & (d < head_dim)
    k = tl.load(k_ptr + t * sk_t + h * sk_h + d, mask=mask)
    v = tl.load(v_ptr + t * sv_t + h * sv_h + d, mask=mask)
    tl.store(kc_ptr + block * skc_b + off * skc_o + h * skc_h + d, k, mask=mask)
    tl.store(vc_ptr + block * svc_b + off * svc_o + h * svc_h + d, v, mask=mask)


def _check(k, v, k_cache, v_cache, slot_mapping) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"k and v must both be [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(
            f"k_cache and v_cache must both be [NB, block_size, {k.shape[1]}, {k.shape[2]}], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(
            f"slot_mapping must be [{k.shape[0]}] int64, "
            f"got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if not k.dtype == v.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(
            f"k, v and the caches must share a dtype, got {k.dtype}, {v.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    if any(t.stride(-1) != 1 for t in (k, v, k_cache, v_cache)) or slot_mapping.stride(0) != 1:
        raise ValueError("k, v and the caches need a contiguous last dim, slot_mapping a stride 1")
    if len({t.device for t in (k, v, k_cache, v_cache, slot_mapping)}) != 1:
        raise ValueError("k, v, the caches and slot_mapping must be on one device")


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    # k, v: [T, Hkv, D]; k_cache, v_cache: [NB, bs, Hkv, D] layer views; slot_mapping: [T] int64
    _check(k, v, k_cache, v_cache, slot_mapping)
    check_runnable(k)
    T, H, D = k.shape
    if T == 0:
        return
    plan_store_kv(k, v, k_cache, v_cache, slot_mapping).run()


def plan_store_kv(k, v, k_cache, v_cache, slot_mapping) -> Launch:
    T, H, D = k.shape
    block_h, block_d = next_pow2(H), next_pow2(D)
    return Launch(
        _store_kv_kernel,
        (T,),
        (
            k,
            v,
            k_cache,
            v_cache,
            slot_mapping,
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            H,
            D,
            k_cache.shape[1],
        ),  # fmt: skip
        dict(BLOCK_H=block_h, BLOCK_D=block_d),
        4 if block_h * block_d >= 2048 else 1,
    )


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep]
    v_cache[blocks, offsets] = v[keep]
