"""The decode baselines of benchmarks/kernels.py and the layouts they read: the engine's paged cache
(16-token pages, K and V of a page side by side), SDPA on padded contiguous copies of it, and
FlexAttention on a cache of its own in 128-token pages (its block size), so that each block of its
block mask is one page of the sequence and it reads only the sequence's tokens, as a paged kernel
does. The layouts are one layer of a Llama-3-8B-like model."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

DTYPE = torch.bfloat16
H, HKV, D, BLOCK = 32, 8, 128, 16
FLEX_PAGE = 128  # FlexAttention's block size: one block of its mask per page


def paged_inputs(b: int, ctx: int, gen: torch.Generator):
    """The engine's layout: a scattered cache of 16-token pages, K and V of a page side by side,
    holding b sequences of ctx tokens (one layer)."""
    nblk = b * (-(-ctx // BLOCK))
    cache = torch.randn(nblk, 2, BLOCK, HKV, D, dtype=DTYPE, device="cuda")
    tables = torch.randperm(nblk, generator=gen).to("cuda", torch.int32).view(b, -1)
    lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(b, H, D, dtype=DTYPE, device="cuda")
    return q, cache[:, 0], cache[:, 1], tables, lens


def flex_inputs(b: int, ctx: int, gen: torch.Generator):
    """FlexAttention's layout: K and V each one [pages * 128, Hkv, D] tensor, its 128-token pages
    scattered over the b sequences."""
    pages = b * (-(-ctx // FLEX_PAGE))
    k = torch.randn(pages * FLEX_PAGE, HKV, D, dtype=DTYPE, device="cuda")
    v = torch.randn(pages * FLEX_PAGE, HKV, D, dtype=DTYPE, device="cuda")
    tables = torch.randperm(pages, generator=gen).to("cuda", torch.int32).view(b, -1)
    lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(b, H, D, dtype=DTYPE, device="cuda")
    return q, k, v, tables, lens


@functools.cache
def compiled_flex():
    """flex_attention compiled once, with dynamic shapes, for every decode shape."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_block_mask(tables: torch.Tensor, num_pages: int):
    """Each sequence's row of the block mask lists its own pages, all full (no mask_mod runs):
    FlexAttention reads exactly the sequence's tokens, as a paged kernel does."""
    from torch.nn.attention.flex_attention import BlockMask

    b, per_seq = tables.shape
    full = torch.full((b, 1, 1), per_seq, dtype=torch.int32, device=tables.device)
    # NOTE: the index tensor's last dim is the whole KV's block count; unused entries are 0.
    idx = torch.zeros(b, 1, 1, num_pages, dtype=torch.int32, device=tables.device)
    idx[:, 0, 0, :per_seq] = tables
    return BlockMask.from_kv_blocks(
        torch.zeros_like(full),
        torch.zeros_like(idx),
        full,
        idx,
        BLOCK_SIZE=FLEX_PAGE,
        seq_lengths=(1, num_pages * FLEX_PAGE),
    )


def flex_prepare(q, k, v, tables, lens):
    """FlexAttention's arguments for one input set, block mask included (built once, untimed)."""
    b, total = q.shape[0], k.shape[0]
    kk = k.view(1, total, HKV, D).transpose(1, 2).expand(b, -1, -1, -1)
    vv = v.view(1, total, HKV, D).transpose(1, 2).expand(b, -1, -1, -1)
    return q[:, :, None], kk, vv, flex_block_mask(tables, total // FLEX_PAGE)


def flex_decode(q, k, v, block_mask, scale):
    out = compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
    return out[:, :, 0]


def sdpa_decode(q, k, v, scale):
    """SDPA on padded KV, pinned to the flash backend, else the efficient one: (fn, backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    errors = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):

        def fn(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

        try:
            fn(q, k, v)
            torch.cuda.synchronize()
            return fn, backend.name
        except RuntimeError as e:  # this backend refuses the shape or GQA
            errors.append(f"{backend.name}: {str(e)[:150]}")
    raise RuntimeError("; ".join(errors))


def padded(q, k_cache, v_cache, tables, lens):
    b = q.shape[0]
    kk = k_cache[tables.long()].reshape(b, -1, HKV, D).transpose(1, 2).contiguous()
    vv = v_cache[tables.long()].reshape(b, -1, HKV, D).transpose(1, 2).contiguous()
    return q[:, :, None, :], kk, vv
