"""apply_rotary against its reference, and the reference against the model's RotaryEmbedding."""

from __future__ import annotations

import pytest
import torch

from baton.kernels.rotary import apply_rotary, apply_rotary_ref
from baton.server.models import layers
from tests.kernels.conftest import ATOL, DEVICE, DTYPES

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
MAX_POS = 256
POSITIONS = [37, 3, 255, 0, 130, 3]  # out of order, one repeated
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# the layer rounds cos/sin and every product to the model dtype: a few ulps from the fp32 ref
LAYER_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _inputs(dtype, head_dim, scaling, h=6, hkv=2, seed=0):
    # -> q: [T, h, D], k: [T, hkv, D] strided views of one qkv row; positions: [T]; rope layer
    g = torch.Generator().manual_seed(seed)
    T = len(POSITIONS)
    qkv = torch.randn(T, (h + 2 * hkv) * head_dim, generator=g).to(DEVICE, dtype)
    q = qkv[:, : h * head_dim].view(T, h, head_dim)
    k = qkv[:, h * head_dim : (h + hkv) * head_dim].view(T, hkv, head_dim)
    rope = layers.RotaryEmbedding(head_dim, MAX_POS, 10000.0, scaling).to(DEVICE)
    return q, k, torch.tensor(POSITIONS, dtype=torch.int64, device=DEVICE), rope


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["default", "llama3"])
def test_apply_rotary_matches_ref(dtype, head_dim, scaling):
    q, k, positions, rope = _inputs(dtype, head_dim, scaling)
    q_out, k_out = apply_rotary(q, k, positions, rope.cos_cache, rope.sin_cache)
    q_ref, k_ref = apply_rotary_ref(q, k, positions, rope.cos_cache, rope.sin_cache)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == dtype
    torch.testing.assert_close(q_out, q_ref, atol=ATOL[dtype], rtol=RTOL[dtype])
    torch.testing.assert_close(k_out, k_ref, atol=ATOL[dtype], rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["default", "llama3"])
def test_ref_matches_model_layer(dtype, scaling):
    q, k, positions, rope = _inputs(dtype, 64, scaling)
    cos, sin = rope(positions, dtype)
    q_layer, k_layer = layers.apply_rotary(q, k, cos, sin)
    q_ref, k_ref = apply_rotary_ref(q, k, positions, rope.cos_cache, rope.sin_cache)
    tol = LAYER_TOL[dtype]
    torch.testing.assert_close(q_ref, q_layer, atol=tol, rtol=tol)
    torch.testing.assert_close(k_ref, k_layer, atol=tol, rtol=tol)


def test_llama3_scaling_changes_the_cache():
    # so the llama3 cases above check something the default ones do not
    _, _, _, default = _inputs(torch.float32, 64, None)
    _, _, _, llama3 = _inputs(torch.float32, 64, LLAMA3)
    assert not torch.allclose(default.cos_cache[POSITIONS], llama3.cos_cache[POSITIONS])


def _bad_inputs():
    q, k, positions, rope = _inputs(torch.float32, 64, None)
    cos, sin = rope.cos_cache, rope.sin_cache
    yield "k head dim", (q, k[..., :32], positions, cos, sin)
    yield "k tokens", (q, k[:2], positions, cos, sin)
    yield "odd head dim", (q[..., :63], k[..., :63], positions, cos[:, :31], sin[:, :31])
    yield "cache width", (q, k, positions, cos[:, :16], sin[:, :16])
    yield "cache dtype", (q, k, positions, cos.half(), sin.half())
    yield "positions dtype", (q, k, positions.int(), cos, sin)
    yield "qk dtype", (q, k.half(), positions, cos, sin)
    yield "last dim", (q.transpose(1, 2).contiguous().transpose(1, 2), k, positions, cos, sin)


@pytest.mark.parametrize("case", list(_bad_inputs()), ids=lambda c: c[0])
def test_rejects_bad_inputs(case):
    with pytest.raises(ValueError):
        apply_rotary(*case[1])
