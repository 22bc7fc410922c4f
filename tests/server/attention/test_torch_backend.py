"""The torch attention backend against dense causal attention over the same tokens."""

from __future__ import annotations

import random

import pytest
import torch

from baton.server.attention import get_attention_backend
from baton.server.attention.metadata import build_attention_metadata
from baton.server.kv_cache import allocate_kv_cache


def dense_reference(q, k, v, scale):
    # q: [S, H, D] for the last rows only; k, v: [S_ctx, Hkv, D]; causal with an offset
    ql, h, _ = q.shape
    s, hkv, _ = k.shape
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    qpos = torch.arange(s - ql, s)[:, None]
    scores = scores.masked_fill(torch.arange(s)[None, :] > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_matches_dense_attention(seed, heads):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    h, hkv, d, bs, nblocks = *heads, 16, 4, 64
    # Decodes first (one new token), then prefills with and without a cached prefix.
    cases = [(1, rng.randint(1, 30)) for _ in range(3)] + [(7, 7), (5, 13), (9, 9 + 4 * bs)]
    free = list(range(nblocks))
    rng.shuffle(free)  # scattered, non-increasing block ids
    cache = allocate_kv_cache(nblocks, 2, bs, hkv, d, torch.float32, "cpu")
    cache.fill_(float("nan"))  # poison: only written slots may be read
    layer = 1
    full_k, full_v, tables, qs, ks, vs = [], [], [], [], [], []
    for ql, sl in cases:
        table = [free.pop() for _ in range((sl + bs - 1) // bs)]
        tables.append(table)
        kk, vv = torch.randn(sl, hkv, d), torch.randn(sl, hkv, d)
        for pos in range(sl - ql):  # the cached prefix
            cache[table[pos // bs], layer, 0, pos % bs] = kk[pos]
            cache[table[pos // bs], layer, 1, pos % bs] = vv[pos]
        full_k.append(kk)
        full_v.append(vv)
        qs.append(torch.randn(ql, h, d))
        ks.append(kk[sl - ql :])
        vs.append(vv[sl - ql :])
    meta = build_attention_metadata([c[0] for c in cases], [c[1] for c in cases], tables, bs, "cpu")
    backend = get_attention_backend("torch", "cpu")
    backend.prepare(meta)
    scale = d**-0.5
    out = backend.forward(torch.cat(qs), torch.cat(ks), torch.cat(vs), cache[:, layer], meta, scale)
    assert meta.num_decodes == 3
    start = 0
    for i, (ql, _) in enumerate(cases):
        ref = dense_reference(qs[i], full_k[i], full_v[i], scale)
        torch.testing.assert_close(out[start : start + ql], ref, atol=1e-5, rtol=1e-5)
        start += ql
    # The new K/V landed in their slots.
    for i, (_ql, sl) in enumerate(cases):
        pos = sl - 1
        torch.testing.assert_close(cache[tables[i][pos // bs], layer, 0, pos % bs], full_k[i][pos])


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="attention_backend"):
        get_attention_backend("nope", "cpu")


def test_metadata_rejects_too_few_blocks():
    with pytest.raises(ValueError, match="bad sequence"):
        build_attention_metadata([3], [40], [[0, 1]], 16, "cpu")
