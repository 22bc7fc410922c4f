"""Paged decode attention (flash-decoding): one query token per sequence over a paged KV cache.

Stage 1 runs one program per (sequence, kv head, split): it packs the GQA group of query heads that
share the kv head into one [BLOCK_H, D] tile, so every K/V tile is read once and multiplied with
`tl.dot`, and writes a normalized partial output plus its log-sum-exp. Stage 2 merges the splits.
Split ranges are computed in the kernel from `seq_lens`, so a fixed `num_splits` needs no host sync
and the call can be captured in a CUDA graph. The split count is the grid's third dimension (and a
run-time argument of the merge), never a constexpr: choosing it per step compiles nothing.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from baton.kernels.launch import Arch, Launch, arch_of
from baton.kernels.utils import check_runnable, interpreting, next_pow2, num_sms

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 32


# NOTE: the block table's row stride is its width, which changes from step to step in eager
# mode; specialized, each new width divisible by 16 (or not) would compile another binary.
@triton.jit(do_not_specialize=["stride_btb"])
def _decode_stage1(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, po_ptr, lse_ptr, out_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in exp2
    stride_qb, stride_qh,
    stride_kn, stride_kt, stride_kh,
    stride_vn, stride_vt, stride_vh,
    stride_btb, stride_lens,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DIRECT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    num_heads = tl.num_programs(1) * GROUP

    seq_len = tl.load(lens_ptr + b * stride_lens)
    # NOTE: equal ranges aligned to the KV tile (so no split ends on a part-filled tile), derived
    # from seq_len alone, so num_splits may stay fixed while seq_lens change; trailing splits of
    # short sequences are empty.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h

    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)

    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    bt_row = bt_ptr + b * stride_btb
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + offs_n
        n_mask = tok < end
        # NOTE: int64, since block * stride_kn exceeds 2**31 for caches past a few GiB.
        blk = tl.load(bt_row + tok // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = tok % BLOCK_SIZE
        # No head-dim mask when D is a power of two, so loads stay vectorized.
        kv_mask = n_mask[:, None] if BLOCK_D == HEAD_DIM else n_mask[:, None] & d_mask[None, :]
        # NOTE: masked with other=0: slots past seq_len hold stale (maybe non-finite) values,
        # and 0 * inf in p @ v would poison the row.
        k = tl.load(
            k_base + (blk * stride_kn + slot * stride_kt)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        v = tl.load(
            v_base + (blk * stride_vn + slot * stride_vt)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # NOTE: each tile has a valid token, so m_new is finite even for padded head rows.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # An empty split (l_i == 0) writes zeros and lse = -inf: the merge weighs it by 0.
    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    acc = acc / l_safe[:, None]
    out_mask = h_mask[:, None] & d_mask[None, :]
    if DIRECT:
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = (b * num_heads + heads) * num_splits + split  # [BLOCK_H]
        tl.store(po_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
        # Natural-log lse; an empty split keeps m_i = -inf, so its lse is -inf.
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
        tl.store(lse_ptr + row, lse, mask=h_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge(
    po_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b * tl.num_programs(1) + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(lse_ptr + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    # NOTE: m is -inf only for seq_len == 0 (a padded CUDA-graph slot): write zeros, not NaN.
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)  # [BLOCK_S]; empty splits weigh 0
    po = tl.load(
        po_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    den = tl.sum(w, axis=0)
    o = tl.sum(po * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + offs_d
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=d_mask)


def choose_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, block_size: int, num_sms: int
) -> int:
    """Splits per sequence: enough (batch, kv head, split) programs for ~4 per SM, but no split
    shorter than MIN_SPLIT_TOKENS (each adds a partial write and a merge), at most MAX_SPLITS."""
    programs = max(1, batch * num_kv_heads)
    wanted = -(-4 * num_sms // programs)
    by_length = max(1, max_seq_len // max(MIN_SPLIT_TOKENS, block_size))
    return max(1, min(wanted, by_length, MAX_SPLITS))


def _launch_config(arch: Arch, head_dim: int, block_size: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) on `arch` (None: the interpreter). Several cache blocks
    per tile keep many loads in flight on GPU; the interpreter is quickest with the same few,
    large tiles (it runs numpy per op)."""
    block_n = max(16, block_size, 64 if head_dim <= 128 else 32)
    return block_n, 4, 1 if arch is None else 2


def _check(q, k_cache, v_cache, block_tables, seq_lens, out) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"q must be [B, H, D] and k_cache [num_blocks, block_size, Hkv, D]; got "
            f"{tuple(q.shape)} and {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, kv_dim = k_cache.shape
    if kv_dim != head_dim or head_dim > 256:
        raise ValueError(f"head dim of q ({head_dim}) and cache ({kv_dim}) must match, <= 256")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q, k_cache and v_cache must share one of fp32/fp16/bf16; got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError(
            f"block_tables and seq_lens must be int32; got {block_tables.dtype}, {seq_lens.dtype}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(
            f"block_tables must be [{batch}, max_blocks] and seq_lens [{batch}]; got "
            f"{tuple(block_tables.shape)} and {tuple(seq_lens.shape)}"
        )
    if out is not None and (out.shape != q.shape or out.dtype not in _DTYPES):
        raise ValueError(f"out must be a float tensor of shape {tuple(q.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dim")
    tensors = (k_cache, v_cache, block_tables, seq_lens) + ((out,) if out is not None else ())
    if any(t.device != q.device for t in tensors):
        raise ValueError("all tensors must be on the device of q")


def decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], last dim contiguous
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor,  # [B] int32, >= 1, the current token included
    scale: float,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,  # [B, H, D]
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context. A fixed `num_splits`
    keeps the call free of host syncs (CUDA-graph capturable); `max_seq_len` only helps choose it.
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens, out)
    check_runnable(q)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = block_tables.shape[1] * block_size
        num_splits = choose_num_splits(
            batch, num_kv_heads, max_seq_len, block_size, num_sms(q.device)
        )
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    partial = lse = out  # one split: stage 1 writes `out` itself and never touches these
    if num_splits > 1:
        partial = torch.empty(
            batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    arch = None if interpreting() else arch_of(q.device)
    plan = plan_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, out, partial, lse, arch)
    for launch in plan:
        launch.run()
    return out


def plan_decode(
    q, k_cache, v_cache, block_tables, seq_lens, scale, out, partial, lse, arch: Arch
) -> list[Launch]:
    """Stage 1 and, with more than one split (the third dim of `partial`), the merge."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    direct = partial is out
    num_splits = 1 if direct else partial.shape[2]
    group = num_heads // num_kv_heads
    block_d = next_pow2(head_dim)
    block_n, num_warps, num_stages = _launch_config(arch, head_dim, block_size)
    stage1 = Launch(
        _decode_stage1,
        (batch, num_kv_heads, num_splits),
        (
            q,
            k_cache,
            v_cache,
            block_tables,
            seq_lens,
            partial,
            lse,
            out,
            scale * math.log2(math.e),
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            block_tables.stride(0),
            seq_lens.stride(0),
            out.stride(0),
            out.stride(1),
        ),  # fmt: skip
        dict(
            GROUP=group,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_H=max(16, next_pow2(group)),
            BLOCK_N=block_n,
            BLOCK_SIZE=block_size,
            DIRECT=direct,
            UPCAST=arch is None,
        ),  # fmt: skip
        num_warps,
        num_stages,
    )
    if direct:
        return [stage1]
    merge = Launch(
        _decode_merge,
        (batch, num_heads),
        (partial, lse, out, out.stride(0), out.stride(1), num_splits),
        # NOTE: one tile wide enough for any split count, so the count compiles nothing.
        dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=MAX_SPLITS),
        4 if block_d >= 128 else 2,
        1,
    )
    return [stage1, merge]


def decode_attention_ref(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
) -> torch.Tensor:
    """The same attention in plain torch, in fp32, over the whole padded table of each sequence."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    tables = block_tables.long()
    k = k_cache[tables].float().flatten(1, 2)  # [B, max_blocks * block_size, Hkv, D]
    v = v_cache[tables].float().flatten(1, 2)
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < seq_lens[:, None]  # [B, N]
    # Padded slots may hold anything (even NaN): zero them so 0-weighted rows stay finite.
    k = torch.where(valid[:, :, None, None], k, 0.0)
    v = torch.where(valid[:, :, None, None], v, 0.0)
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=2)  # [B, N, H, D]
    v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bhd,bnhd->bhn", q.float(), k) * scale
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhn,bnhd->bhd", s.softmax(dim=-1), v).to(q.dtype)
