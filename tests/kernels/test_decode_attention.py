"""decode_attention against its torch reference, and the reference against dense softmax attention,
on scattered paged caches whose unused slots (other layers, tails of last blocks) are NaN."""

from __future__ import annotations

import pytest
import torch

from baton.kernels.decode_attention import (
    MAX_SPLITS,
    choose_num_splits,
    decode_attention,
    decode_attention_ref,
)
from tests.kernels.conftest import ATOL, DEVICE, DTYPES, poisoned

NL, LAYER = 2, 1
# Ragged: a single token, lengths off the block grid, one spanning several BLOCK_N tiles.
SEQ_LENS = [1, 37, 300, 130]


def _inputs(dtype, seq_lens, num_heads, num_kv_heads, d, bs, seed=0):
    # -> q: [B, H, D]; kv: [NB, NL, 2, bs, Hkv, D]; block_tables: [B, max_blocks]; seq_lens: [B]
    g = torch.Generator().manual_seed(seed)
    nblocks = [-(-n // bs) for n in seq_lens]
    num_blocks = sum(nblocks) + 3  # a few blocks nobody owns
    # Scattered, non-increasing block ids; padding entries stay 0, a real block of someone.
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(seq_lens), max(nblocks), dtype=torch.int32)
    kv = torch.full((num_blocks, NL, 2, bs, num_kv_heads, d), float("nan"))
    used = 0
    for b, (n, nb) in enumerate(zip(seq_lens, nblocks, strict=True)):
        tables[b, :nb] = perm[used : used + nb]
        used += nb
        for t in range(n):  # only this layer's live slots get values: any other read is NaN
            kv[tables[b, t // bs], LAYER, :, t % bs] = torch.randn(2, num_kv_heads, d, generator=g)
    q = torch.randn(len(seq_lens), num_heads, d, generator=g)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return q.to(DEVICE, dtype), kv.to(DEVICE, dtype), tables.to(DEVICE), lens.to(DEVICE)


def _dense(q, kv, tables, seq_lens, scale):
    """Per sequence: gather its K/V token by token, then softmax(q k^T) v per query head."""
    bs, num_kv_heads = kv.shape[3], kv.shape[4]
    group = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float32)
    for b, n in enumerate(seq_lens.tolist()):
        toks = [(int(tables[b, t // bs]), t % bs) for t in range(n)]
        k = torch.stack([kv[blk, LAYER, 0, slot] for blk, slot in toks]).float()  # [n, Hkv, D]
        v = torch.stack([kv[blk, LAYER, 1, slot] for blk, slot in toks]).float()
        for h in range(q.shape[1]):
            p = torch.softmax(k[:, h // group] @ q[b, h].float() * scale, dim=0)  # [n]
            out[b, h] = p @ v[:, h // group]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,d,bs,num_splits",
    [
        (8, 2, 64, 16, 1),  # GQA, stage 1 writes out directly
        (4, 4, 128, 16, 3),  # MHA, splits of uneven use
        (8, 2, 64, 32, 8),  # short sequences leave trailing splits empty
        (8, 2, 128, 16, None),  # chosen from the table width
    ],
)
def test_decode_attention_matches_ref(dtype, num_heads, num_kv_heads, d, bs, num_splits):
    q, kv, tables, lens = _inputs(dtype, SEQ_LENS, num_heads, num_kv_heads, d, bs)
    k_cache, v_cache = kv[:, LAYER, 0], kv[:, LAYER, 1]
    assert not k_cache.is_contiguous()
    scale = d**-0.5
    out = poisoned(q.shape, dtype)
    got = decode_attention(q, k_cache, v_cache, tables, lens, scale, num_splits=num_splits, out=out)
    assert got is out
    expected = decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
    assert expected.isfinite().all()
    torch.testing.assert_close(out, expected, atol=ATOL[dtype], rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_strided_q_padded_d_and_hint(dtype):
    # q as a view into a fused qkv projection; a head dim that is not a power of two (padded tile).
    # The max_seq_len hint only picks the split count: a generous one splits these short contexts.
    seq_lens = [300, 5]
    num_heads, num_kv_heads, d = 4, 1, 80
    q, kv, tables, lens = _inputs(dtype, seq_lens, num_heads, num_kv_heads, d, 16, seed=1)
    qkv = torch.randn(len(seq_lens), num_heads + 2 * num_kv_heads, d).to(DEVICE, dtype)
    qkv[:, :num_heads] = q
    q = qkv[:, :num_heads]
    args = (q, kv[:, LAYER, 0], kv[:, LAYER, 1], tables, lens, 0.2)
    assert choose_num_splits(len(seq_lens), num_kv_heads, 1024, 16, 4) > 1
    got = decode_attention(*args, max_seq_len=1024)
    torch.testing.assert_close(got, decode_attention_ref(*args), atol=ATOL[dtype], rtol=1e-2)


@pytest.mark.parametrize("num_heads,num_kv_heads,bs", [(8, 2, 16), (3, 3, 8)])
def test_ref_matches_dense_attention(num_heads, num_kv_heads, bs):
    q, kv, tables, lens = _inputs(torch.float32, SEQ_LENS, num_heads, num_kv_heads, 32, bs)
    got = decode_attention_ref(q, kv[:, LAYER, 0], kv[:, LAYER, 1], tables, lens, 0.3)
    expected = _dense(q.cpu(), kv.cpu(), tables.cpu(), lens.cpu(), 0.3)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)
    # A single token attends only to itself.
    only_v = kv[tables[0, 0], LAYER, 1, 0].repeat_interleave(num_heads // num_kv_heads, dim=0)
    torch.testing.assert_close(got[0], only_v)


def test_choose_num_splits():
    assert choose_num_splits(1, 8, 200, 16, 132) == 1  # short context: never split
    assert choose_num_splits(64, 8, 128, 16, 132) == 1
    long_small = choose_num_splits(1, 8, 8192, 16, 132)
    assert 1 < long_small <= MAX_SPLITS
    assert choose_num_splits(1, 1, 1 << 20, 16, 132) == MAX_SPLITS  # bounded
    # No split shorter than ~256 tokens.
    assert choose_num_splits(1, 1, 1024, 16, 132) <= 4
    # A full GPU needs fewer splits.
    assert choose_num_splits(256, 8, 8192, 16, 132) <= choose_num_splits(2, 8, 8192, 16, 132)
    # Enough programs to fill the GPU when the context allows it.
    assert 2 * 8 * choose_num_splits(2, 8, 8192, 16, 132) >= 2 * 132


def _bad_calls():
    # -> (id, args before scale, kwargs, message match)
    q, kv, tables, lens = _inputs(torch.float32, [5, 20], 4, 2, 16, 8)
    kc, vc = kv[:, LAYER, 0], kv[:, LAYER, 1]
    strided_d = kc.transpose(2, 3).contiguous().transpose(2, 3)
    return [
        ("q rank", (q[0], kc, vc, tables, lens), {}, "must be"),
        ("v shape", (q, kc, vc[:, :4], tables, lens), {}, "v_cache"),
        ("head dim", (q[..., :8], kc, vc, tables, lens), {}, "head dim"),
        ("groups", (q[:, :3], kc, vc, tables, lens), {}, "multiple"),
        ("block size", (q, kv[:6, LAYER, 0, :6], kv[:6, LAYER, 1, :6], tables, lens), {}, "power"),
        ("dtype mix", (q.half(), kc, vc, tables, lens), {}, "share"),
        ("float64", (q.double(), kc.double(), vc.double(), tables, lens), {}, "share"),
        ("table dtype", (q, kc, vc, tables.long(), lens), {}, "int32"),
        ("lens dtype", (q, kc, vc, tables, lens.long()), {}, "int32"),
        ("lens shape", (q, kc, vc, tables, lens[:1]), {}, "seq_lens"),
        ("last dim", (q, strided_d, strided_d, tables, lens), {}, "contiguous"),
        ("out shape", (q, kc, vc, tables, lens), {"out": torch.empty_like(q[:1])}, "out"),
        ("num_splits", (q, kc, vc, tables, lens), {"num_splits": 0}, "num_splits"),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize(
    "args,kwargs,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_decode_attention_rejects_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        decode_attention(*args, 0.5, **kwargs)


@pytest.mark.gpu
def test_decode_attention_cuda_graph_replays_with_new_lengths():
    # A fixed num_splits makes the call sync-free: capture once, replay as the context grows.
    dtype = DTYPES[-1]
    q, kv, tables, lens = _inputs(dtype, [300, 90, 1, 257], 8, 2, 128, 16)
    k_cache, v_cache = kv[:, LAYER, 0], kv[:, LAYER, 1]
    out = poisoned(q.shape, dtype)
    live = lens - torch.tensor([0, 40, 0, 100], dtype=torch.int32, device=DEVICE)
    decode_attention(q, k_cache, v_cache, tables, live, 0.1, num_splits=4, out=out)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k_cache, v_cache, tables, live, 0.1, num_splits=4, out=out)
    for new in (lens - torch.tensor([0, 20, 0, 50], device=DEVICE, dtype=torch.int32), lens):
        live.copy_(new)
        out.fill_(float("nan"))
        graph.replay()
        expected = decode_attention_ref(q, k_cache, v_cache, tables, live, 0.1)
        torch.testing.assert_close(out, expected, atol=ATOL[dtype], rtol=1e-2)
