"""silu_and_mul against its reference, and the reference against the model's SiluAndMul."""

from __future__ import annotations

import pytest
import torch

from baton.kernels.silu_mul import silu_and_mul, silu_and_mul_ref
from baton.server.models.layers import SiluAndMul
from tests.kernels.conftest import ATOL, DEVICE, DTYPES

RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# the layer rounds silu(gate) to the model dtype before the product: one more rounding
LAYER_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _inputs(dtype, n, t=7, seed=0):
    # -> gate, up: [t, n], the two halves of one gate_up projection (rows strided)
    g = torch.Generator().manual_seed(seed)
    gate_up = (2 * torch.randn(t, 2 * n, generator=g)).to(DEVICE, dtype)
    return gate_up[:, :n], gate_up[:, n:]


# 352: not a power of two; 2500: several column tiles, the last one partial
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [128, 352, 2500])
def test_silu_and_mul_matches_ref(dtype, n):
    gate, up = _inputs(dtype, n)
    out = silu_and_mul(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, silu_and_mul_ref(gate, up), atol=ATOL[dtype], rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ref_matches_model_layer(dtype):
    gate, up = _inputs(dtype, 352)
    tol = LAYER_TOL[dtype]
    torch.testing.assert_close(
        silu_and_mul_ref(gate, up), SiluAndMul()(gate, up), atol=tol, rtol=tol
    )


def test_empty_batch():
    gate, up = _inputs(torch.float32, 64, t=0)
    assert silu_and_mul(gate, up).shape == (0, 64)


def _bad_inputs():
    gate, up = _inputs(torch.float32, 64)
    yield "shapes", (gate, up[:, :32])
    yield "3d", (gate[None], up[None])
    yield "dtypes", (gate, up.half())
    yield "int", (gate.long(), up.long())
    yield "last dim", (gate.t().contiguous().t(), up)


@pytest.mark.parametrize("case", list(_bad_inputs()), ids=lambda c: c[0])
def test_rejects_bad_inputs(case):
    with pytest.raises(ValueError):
        silu_and_mul(*case[1])
