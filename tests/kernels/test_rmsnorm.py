"""rms_norm / fused_add_rms_norm against their references, and the references against RMSNorm."""

from __future__ import annotations

import pytest
import torch

from baton.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from baton.server.models.layers import RMSNorm
from tests.kernels.conftest import ATOL, DEVICE, DTYPES

EPS = 1e-5
# a rounding flip of the normalised value before `weight *` costs one ulp of the output
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _inputs(dtype, n, t=5, seed=0, strided=False):
    # -> x, residual: [t, n]; weight: [n]
    g = torch.Generator().manual_seed(seed)
    width = n + 8 if strided else n  # strided: rows of a wider buffer
    x = torch.randn(t, width, generator=g).to(DEVICE, dtype)[:, :n]
    residual = torch.randn(t, n, generator=g).to(DEVICE, dtype)
    weight = (1 + 0.5 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    return x, residual, weight


# 576: SmolLM2's hidden size, not a power of two; 5000: wider than one block, walked in chunks
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,strided", [(64, False), (576, True), (5000, False)])
def test_rms_norm_matches_ref(dtype, n, strided):
    x, _, weight = _inputs(dtype, n, strided=strided)
    out = rms_norm(x, weight, EPS)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(
        out, rms_norm_ref(x, weight, EPS), atol=ATOL[dtype], rtol=RTOL[dtype]
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 576, 5000])
def test_fused_add_rms_norm_matches_ref(dtype, n):
    x, residual, weight = _inputs(dtype, n, strided=n == 576)
    out, res = fused_add_rms_norm(x, residual, weight, EPS)
    ref_out, ref_res = fused_add_rms_norm_ref(x, residual, weight, EPS)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)  # one rounding of x + residual
    torch.testing.assert_close(out, ref_out, atol=ATOL[dtype], rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_refs_match_model_layer(dtype):
    x, residual, weight = _inputs(dtype, 576)
    layer = RMSNorm(576, EPS).to(DEVICE, dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        torch.testing.assert_close(rms_norm_ref(x, weight, EPS), layer(x), atol=0, rtol=0)
        out, res = layer(x, residual)
    ref_out, ref_res = fused_add_rms_norm_ref(x, residual, weight, EPS)
    torch.testing.assert_close(ref_out, out, atol=0, rtol=0)
    torch.testing.assert_close(ref_res, res, atol=0, rtol=0)


def test_empty_batch():
    x, residual, weight = _inputs(torch.float32, 64, t=0)
    assert rms_norm(x, weight, EPS).shape == (0, 64)
    assert fused_add_rms_norm(x, residual, weight, EPS)[1].shape == (0, 64)


def _bad_inputs():
    x, residual, weight = _inputs(torch.float32, 64)
    yield "3d", (x[None], None, weight)
    yield "weight size", (x, None, weight[:32])
    yield "weight dtype", (x.half(), None, weight)
    yield "residual shape", (x, residual[:, :32], weight)
    yield "residual dtype", (x, residual.half(), weight)
    yield "last dim", (x.t().contiguous().t(), None, weight)


@pytest.mark.parametrize("case", list(_bad_inputs()), ids=lambda c: c[0])
def test_rejects_bad_inputs(case):
    x, residual, weight = case[1]
    with pytest.raises(ValueError):
        if residual is None:
            rms_norm(x, weight, EPS)
        else:
            fused_add_rms_norm(x, residual, weight, EPS)
