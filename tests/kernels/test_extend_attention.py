from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baton.kernels.extend_attention import extend_attention, extend_attention_ref
from tests.kernels.conftest import ATOL, DEVICE, DTYPES, poisoned

NUM_LAYERS, LAYER = 2, 1


def make_batch(seqs, heads, kv_heads, head_dim, page, dtype, seed=0):
    """seqs: [(prefix_len, query_len)]. Returns kernel args plus each sequence's dense K/V.

    Pages are handed out in a random order from a NaN-filled two-layer cache (page 0 is never
    handed out, and pads the block tables), so a wrong slot or a padding read poisons the output.
    Prefix and new K/V are both written to the cache, as the engine does before attention.
    """
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)
    pages_per_seq = [math.ceil((p + n) / page) for p, n in seqs]
    num_pages = sum(pages_per_seq) + 3
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    kv_cache = torch.full((num_pages, NUM_LAYERS, 2, page, kv_heads, head_dim), float("nan"))
    kv_cache = kv_cache.to(dtype)
    k_cache, v_cache = kv_cache[:, LAYER, 0], kv_cache[:, LAYER, 1]
    block_tables = torch.zeros(len(seqs), max(pages_per_seq) + 2, dtype=torch.int32)
    dense, new_k, new_v = [], [], []
    for i, ((prefix, n), used) in enumerate(zip(seqs, pages_per_seq, strict=True)):
        pages = torch.tensor([order.pop() for _ in range(used)])
        block_tables[i, :used] = pages
        k_full, v_full = rand(prefix + n, kv_heads, head_dim), rand(prefix + n, kv_heads, head_dim)
        pos = torch.arange(prefix + n)
        k_cache[pages[pos // page], pos % page] = k_full
        v_cache[pages[pos // page], pos % page] = v_full
        dense.append((k_full, v_full))
        new_k.append(k_full[prefix:])
        new_v.append(v_full[prefix:])
    lens = torch.tensor([n for _, n in seqs])
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = lens.cumsum(0)
    args = dict(
        q=rand(int(lens.sum()), heads, head_dim),
        k=torch.cat(new_k),
        v=torch.cat(new_v),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        query_start_loc=qsl,
        seq_lens=torch.tensor([p + n for p, n in seqs], dtype=torch.int32),
    )
    args = {name: t.to(DEVICE) for name, t in args.items()}
    return args, dense


# (heads, kv_heads, head_dim, page, [(prefix_len, query_len)]): ragged prefixes and queries,
# an empty prefix, a single new token, several M tiles, lengths off the page size.
CASES = [
    (8, 2, 64, 16, [(0, 37), (21, 1), (50, 19)]),
    (4, 4, 128, 8, [(33, 17), (0, 1), (16, 40)]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,page,seqs", CASES)
def test_matches_reference(heads, kv_heads, head_dim, page, seqs, dtype):
    args, _ = make_batch(seqs, heads, kv_heads, head_dim, page, dtype)
    scale = head_dim**-0.5
    out = poisoned(args["q"].shape, dtype)
    got = extend_attention(**args, max_query_len=max(n for _, n in seqs), scale=scale, out=out)
    assert got.data_ptr() == out.data_ptr()
    want = extend_attention_ref(**args, scale=scale)
    torch.testing.assert_close(got, want, atol=ATOL[dtype], rtol=ATOL[dtype])


def test_allocates_output_and_handles_a_single_sequence():
    args, _ = make_batch([(40, 5)], 4, 1, 64, 16, torch.float32, seed=1)
    got = extend_attention(**args, max_query_len=5, scale=0.2)
    torch.testing.assert_close(got, extend_attention_ref(**args, scale=0.2), atol=1e-5, rtol=1e-5)


def test_reference_matches_dense_sdpa():
    seqs = [(0, 9), (19, 1), (30, 12)]
    heads, kv_heads, head_dim = 8, 2, 64
    args, dense = make_batch(seqs, heads, kv_heads, head_dim, 16, torch.float32, seed=2)
    want = extend_attention_ref(**args, scale=0.3)
    qsl = args["query_start_loc"].tolist()
    for i, ((prefix, n), (k_full, v_full)) in enumerate(zip(seqs, dense, strict=True)):
        q = args["q"][qsl[i] : qsl[i + 1]].transpose(0, 1)  # [H, n, D]
        k_full = k_full.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1).to(q.device)
        v_full = v_full.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1).to(q.device)
        mask = torch.ones(n, prefix + n, dtype=torch.bool, device=q.device).tril(prefix)
        o = F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask, scale=0.3)
        torch.testing.assert_close(want[qsl[i] : qsl[i + 1]], o.transpose(0, 1))


def _bad(args, **changes):
    return {**args, **changes}


def test_rejects_bad_inputs():
    args, _ = make_batch([(3, 4), (0, 2)], 4, 2, 64, 16, torch.float32)
    call = lambda **a: extend_attention(**a, max_query_len=4, scale=0.1)
    q, k = args["q"], args["k"]
    cases = {
        "must be \\[T, heads, D\\]": _bad(args, q=q[0]),
        "k and v must be": _bad(args, k=k[:, :, :32]),
        "not a multiple": _bad(args, q=torch.randn(6, 3, 64, device=DEVICE)),
        "power of two": _bad(args, q=q[..., :48], k=k[..., :48], v=args["v"][..., :48]),
        "k_cache must be": _bad(args, k_cache=args["k_cache"][..., :32]),
        "must match k_cache": _bad(args, v_cache=args["v_cache"][:2]),
        "strides .* must match": _bad(args, v_cache=args["v_cache"].contiguous()),
        "share one dtype": _bad(args, k=k.half()),
        "must be int32": _bad(args, seq_lens=args["seq_lens"].long()),
        "expected seq_lens": _bad(args, query_start_loc=args["query_start_loc"][:2]),
        "contiguous in its last dim": _bad(args, q=q.transpose(1, 2).contiguous().transpose(1, 2)),
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            call(**bad)
    with pytest.raises(ValueError, match="out must be"):
        call(**args, out=torch.empty_like(q).half())
    with pytest.raises(ValueError, match="share one dtype"):
        call(**{name: t.double() if t.is_floating_point() else t for name, t in args.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_tiles_long_sequences(dtype):
    # The GPU launch config (128-row tiles) is only exercised by sequences this long.
    seqs = [(700, 300), (0, 517), (64, 1)]
    args, _ = make_batch(seqs, 32, 8, 128, 16, dtype, seed=3)
    out = poisoned(args["q"].shape, dtype)
    extend_attention(**args, max_query_len=517, scale=128**-0.5, out=out)
    want = extend_attention_ref(**args, scale=128**-0.5)
    torch.testing.assert_close(out, want, atol=ATOL[dtype], rtol=ATOL[dtype])
