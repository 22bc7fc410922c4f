"""Shared layers against their transformers counterparts."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from baton.server.models.layers import (
    FusedRows,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    rope_inv_freq,
)

ROPES = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
]
MKL_PACKED = ((1, "mkl-packed"),)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_nn_linear_unpacked_and_packed(bias, dtype):
    torch.manual_seed(0)
    ours = Linear(48, 96, bias=bias).to(dtype)
    ref = torch.nn.Linear(48, 96, bias=bias).to(dtype)
    ref.load_state_dict(ours.state_dict())
    xs = [torch.randn(rows, 48, dtype=dtype) for rows in (0, 1, 7, 64)]
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        if dtype != torch.float32:
            with pytest.raises(ValueError, match="float32"):
                ours.use_plan(MKL_PACKED, release=True)
            return
        ours.use_plan(MKL_PACKED, release=True)
        assert ours.weight.numel() == 0 and ours.planned is not None  # the unpacked copy is gone
        for x in xs:
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_linear_packed_without_release_keeps_its_weight():
    lin = Linear(16, 8, bias=False)
    before = lin.weight.detach().clone()
    lin.use_plan(MKL_PACKED, release=False)
    assert torch.equal(lin.weight, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf_and_fuses_the_residual(dtype):
    torch.manual_seed(0)
    x, res = torch.randn(5, 32, dtype=dtype), torch.randn(5, 32, dtype=dtype)
    ours, ref = RMSNorm(32, 1e-5).to(dtype), LlamaRMSNorm(32, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    assert torch.equal(ours(x), ref(x))
    normed, summed = ours(x, res)
    assert torch.equal(summed, x + res) and torch.equal(normed, ref(x + res))


@pytest.mark.parametrize("scaling", ROPES, ids=["default", "linear", "llama3"])
def test_rope_matches_hf(scaling):
    head_dim, theta = 128, 500000.0
    params = {"rope_theta": theta, "rope_type": "default", **(scaling or {})}
    cfg = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=131072,
        rope_parameters=params,
    )
    if scaling is not None:
        ref_inv_freq, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
        assert factor == 1.0
        assert torch.equal(rope_inv_freq(head_dim, theta, scaling), ref_inv_freq)

    rope = RotaryEmbedding(head_dim, 4096, theta, scaling)
    positions = torch.tensor([0, 1, 17, 4095, 300])
    q, k = torch.randn(5, 4, head_dim), torch.randn(5, 2, head_dim)
    cos, sin = rope(positions, torch.float32)
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    # HF layout: [B, H, T, D] with cos/sin [B, T, D]
    ref_q, ref_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None]
    )
    ours_q, ours_k = apply_rotary(q, k, cos, sin)
    assert torch.equal(ours_q, ref_q[0].transpose(0, 1))
    assert torch.equal(ours_k, ref_k[0].transpose(0, 1))


def test_rope_cache_stays_fp32_and_follows_the_device():
    rope = RotaryEmbedding(16, 64, 10000.0, None)
    assert rope.cos_cache.dtype == torch.float32 and rope.cos_cache.shape == (64, 8)
    cos, sin = rope(torch.tensor([3]), torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.shape == (1, 1, 16)


def three_linears(bias: bool):
    """Three linears reading one input, that input, and their separate outputs."""
    torch.manual_seed(0)
    parts = [Linear(16, n, bias=bias) for n in (8, 4, 4)]
    x = torch.randn(5, 16)
    with torch.no_grad():
        return parts, x, [m(x) for m in parts]


@pytest.mark.parametrize("bias", [False, True])
def test_fused_rows_equal_the_separate_linears_and_follow_their_loads(bias):
    parts, x, expected = three_linears(bias)
    with torch.no_grad():
        fused = FusedRows(*parts)
        for got, want in zip(fused(x), expected, strict=True):
            torch.testing.assert_close(got, want)
        # the parameters are views of the stack: loading one (a copy into it) updates the stack
        new = torch.randn(4, 16)
        parts[1].weight.copy_(new)
        torch.testing.assert_close(fused(x)[1], parts[1](x))
        torch.testing.assert_close(fused.weight[8:12], new)
    assert parts[2].weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()


def test_fused_rows_refuse_a_mix_of_biases():
    with pytest.raises(ValueError, match="bias"):
        FusedRows(Linear(4, 4, bias=True), Linear(4, 4, bias=False))


@pytest.mark.parametrize("bias", [False, True])
def test_packed_fused_rows_free_the_stack_and_keep_the_biases(bias):
    parts, x, expected = three_linears(bias)
    with torch.no_grad():
        fused = FusedRows(*parts)
        fused.use_plan(MKL_PACKED, release=True)
        for got, want in zip(fused(x), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fused.weight is None and all(p.weight.numel() == 0 for p in parts)
    assert all((p.bias is not None) == bias for p in parts)
    if bias:
        assert parts[1].bias.shape == (4,)
