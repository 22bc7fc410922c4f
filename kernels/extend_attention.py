"""Paged prefill ("extend") attention: new tokens see their cached prefix and, causally, each other.

Each sequence's earlier tokens (prefix-cache hits, earlier prefill chunks) sit in the paged KV
cache; its new tokens' K/V come in contiguous tensors (also already written to the cache, but read
from there they would cost a gather). One program owns BLOCK_M new tokens of one (sequence, head):
phase 1 streams the prefix through the block table with only a length mask, phase 2 streams the
new tokens up to the tile's last row, masking only the diagonal tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.extend_config import launch_config
from baton.kernels.launch import Arch, Launch, arch_of
from baton.kernels.utils import check_runnable, interpreting

LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, mask, MASKED: tl.constexpr):
    # q: [BM, D], k/v: [BN, D]; acc: [BM, D] fp32; m_i is the running max in log2 units.
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(mask, qk, float("-inf"))
    # NOTE: every row has seen at least one unmasked key before any all-masked tile (the first
    # prefix tile or new token 0 is visible to all rows), so m_new is finite and exp2 never NaNs.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _load_paged(
    k_base, v_base, bt_row, offs_n, offs_d, n_valid, stride_cb, stride_cs,
    PAGE: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # Gathers BN prefix tokens through the block table: token n lives in slot n % PAGE of page
    # bt_row[n // PAGE]. Returns k, v: [BN, D].
    if MASKED:
        valid = offs_n < n_valid
        blk = tl.load(bt_row + offs_n // PAGE, mask=valid, other=0)
    else:
        blk = tl.load(bt_row + offs_n // PAGE)
    # NOTE: int64 page offsets: a whole multi-layer cache easily exceeds 2**31 elements.
    row = blk.to(tl.int64) * stride_cb + (offs_n % PAGE) * stride_cs
    ptrs = row[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_base + ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_base + ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_base + ptrs)
        v = tl.load(v_base + ptrs)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


# NOTE: prefills slice the step's block tables and lengths after its decodes, so their row
# stride (the table's width) and their pointers' alignment change from step to step; each
# change would compile another binary if they were specialized.
@triton.jit(do_not_specialize=["bt_ptr", "seq_lens_ptr", "stride_bt"])
def _extend_attention_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # q/out: [T, H, D]; k/v: [T, Hkv, D]; caches: [num_pages, PAGE, Hkv, D]; bt: [B, max_pages]
    b = tl.program_id(0)
    h = tl.program_id(1)
    # NOTE: the tiles furthest down a sequence do the most work (longest causal span), so they
    # get the lowest block ids and start first; short sequences' extra tiles exit at once.
    start_m = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    prefix_len = tl.load(seq_lens_ptr + b) - q_len
    if start_m * BLOCK_M >= q_len:
        return
    kvh = h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    tok0 = q_start.to(tl.int64)

    q_ptrs = (
        q_ptr + tok0 * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Phase 1: the cached prefix, visible to every row; only its last tile needs a length mask.
    kc_base = kc_ptr + kvh * stride_ch
    vc_base = vc_ptr + kvh * stride_ch
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    n_full = (prefix_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        k, v = _load_paged(
            kc_base, vc_base, bt_row, start_n + offs_n, offs_d, prefix_len,
            stride_cb, stride_cs, PAGE, False, UPCAST,
        )  # fmt: skip
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, None, False)
    if n_full < prefix_len:
        cols = n_full + offs_n
        k, v = _load_paged(
            kc_base, vc_base, bt_row, cols, offs_d, prefix_len,
            stride_cb, stride_cs, PAGE, True, UPCAST,
        )  # fmt: skip
        mask = (cols < prefix_len)[None, :]
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, mask, True)

    # Phase 2: the new tokens. Tiles left of the diagonal are fully visible and in range
    # (NOTE: BLOCK_M % BLOCK_N == 0, so they end exactly at start_m * BLOCK_M < q_len).
    k_base = k_ptr + tok0 * stride_kt + kvh * stride_kh
    v_base = v_ptr + tok0 * stride_vt + kvh * stride_vh
    diag = start_m * BLOCK_M
    for start_n in range(0, diag, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :])
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, None, False)
    # Diagonal tiles: causal mask; keys past q_len only meet padding rows (col <= row), which are
    # never stored, but must not be loaded.
    for start_n in range(diag, tl.minimum(diag + BLOCK_M, q_len), BLOCK_N):
        cols = start_n + offs_n
        col_ok = (cols < q_len)[:, None]
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=col_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=col_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        mask = offs_m[:, None] >= cols[None, :]
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, mask, True)

    o = acc / l_i[:, None]
    o_ptrs = (
        out_ptr + tok0 * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    )
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves.

    q/out: [T, H, D]; k/v: [T, Hkv, D]; k_cache/v_cache: [num_blocks, block_size, Hkv, D] with
    equal strides; block_tables: [B, max_blocks] int32; query_start_loc: [B + 1] int32; seq_lens:
    [B] int32, prefix + new tokens. max_query_len (host int) bounds every query length. Every
    tensor is contiguous in its last dim.
    """
    check_runnable(q)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, heads, D]; got {q.shape}, {k.shape}, {v.shape}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"k and v must be [{num_tokens}, Hkv, {head_dim}]; got {k.shape}, {v.shape}"
        )
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256], got {head_dim}")
    if k_cache.dim() != 4 or k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(f"k_cache must be [blocks, block_size, {num_kv_heads}, {head_dim}]; "
                         f"got {k_cache.shape}")  # fmt: skip
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        # NOTE: one set of strides addresses both caches (as two views of one KV tensor have).
        raise ValueError(
            f"v_cache {v_cache.shape} strides {v_cache.stride()} must match k_cache "
            f"{k_cache.shape} strides {k_cache.stride()}"
        )
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {q.dtype} {q.shape}; got {out.dtype} {out.shape}")
    if q.dtype not in _DTYPES or any(t.dtype != q.dtype for t in (k, v, k_cache, v_cache)):
        raise ValueError(
            "q, k, v, k_cache, v_cache must share one dtype of fp32/fp16/bf16; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    batch = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if (
        seq_lens.dim() != 1
        or query_start_loc.shape != (batch + 1,)
        or block_tables.dim() != 2
        or block_tables.shape[0] != batch
    ):
        raise ValueError(
            "expected seq_lens [B], query_start_loc [B + 1], block_tables [B, max_blocks]; got "
            f"{seq_lens.shape}, {query_start_loc.shape}, {block_tables.shape}"
        )
    if any(t.dtype != torch.int32 for t in (block_tables, query_start_loc, seq_lens)):
        raise ValueError("block_tables, query_start_loc and seq_lens must be int32")
    named = dict(
        q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, out=out, block_tables=block_tables
    )
    for name, t in named.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (strides {t.stride()})")
    if batch == 0 or num_tokens == 0 or max_query_len <= 0:
        return out

    arch = None if interpreting() else arch_of(q.device)
    plan_extend(
        q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len,
        scale, out, arch,
    ).run()  # fmt: skip
    return out


def plan_extend(
    q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len, scale,
    out, arch: Arch,
) -> Launch:  # fmt: skip
    batch, (_, num_heads, head_dim) = seq_lens.shape[0], q.shape
    block_m, block_n, num_warps, num_stages = launch_config(arch, q.dtype, head_dim, max_query_len)
    return Launch(
        _extend_attention_kernel,
        (batch, num_heads, triton.cdiv(max_query_len, block_m)),
        (
            q,
            k,
            v,
            k_cache,
            v_cache,
            block_tables,
            query_start_loc,
            seq_lens,
            out,
            scale * LOG2E,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            block_tables.stride(0),
            out.stride(0),
            out.stride(1),
        ),  # fmt: skip
        dict(
            GROUP=num_heads // k.shape[1],
            HEAD_DIM=head_dim,
            PAGE=k_cache.shape[1],
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            UPCAST=arch is None,
        ),  # fmt: skip
        num_warps,
        num_stages,
    )


def extend_attention_ref(
    q, k, v, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale
) -> torch.Tensor:
    """Torch reference: gathers each prefix from the cache, fp32 math, returns q.dtype."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    page = k_cache.shape[1]
    for b in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        q_len = end - start
        prefix = int(seq_lens[b]) - q_len
        pages = block_tables[b, : triton.cdiv(prefix, page)].long()
        kp = k_cache[pages].flatten(0, 1)[:prefix]
        vp = v_cache[pages].flatten(0, 1)[:prefix]
        keys = torch.cat([kp, k[start:end]]).float().repeat_interleave(group, dim=1)
        vals = torch.cat([vp, v[start:end]]).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), keys) * scale
        pos = torch.arange(prefix + q_len, device=q.device)
        visible = pos[None, :] <= (prefix + torch.arange(q_len, device=q.device))[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals).to(q.dtype)
    return out
