"""MKL-packed float32 CPU linears: the same products as F.linear at every row count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baton.server.models import cpu_linear
from baton.server.models.cpu_linear import PACK_ROWS, PackedWeight


def test_the_cpu_wheel_packs_for_mkl():
    # Losing this path costs a small model's decode steps 1.2-1.6x at 4..64 rows.
    assert cpu_linear.MKL_PACKED
    assert cpu_linear.can_pack(torch.ones(2, 2))
    assert not cpu_linear.can_pack(torch.ones(2, 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("bias", [False, True])
def test_one_packing_serves_every_row_count(bias):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 40, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    packed = PackedWeight(w, b)
    for rows in (0, 1, 2, 5, PACK_ROWS - 1, PACK_ROWS, PACK_ROWS + 1, 3 * PACK_ROWS + 7):
        x = torch.randn(rows, 40, generator=gen)
        got = packed(x)
        assert got.shape == (rows, 96)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # leading dimensions are rows too, and a strided input is read as its values
    x = torch.randn(3, 4, 40, generator=gen)
    torch.testing.assert_close(packed(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    xt = torch.randn(40, 6, generator=gen).t()
    torch.testing.assert_close(packed(xt), F.linear(xt, w, b), rtol=1e-5, atol=1e-5)


def test_the_packed_copy_does_not_hold_the_original():
    w = torch.randn(64, 32)
    packed = PackedWeight(w, None)
    x = torch.randn(4, 32)
    want = F.linear(x, w)
    w.fill_(float("nan"))  # whatever happens to the original later, the product stays
    torch.testing.assert_close(packed(x), want, rtol=1e-5, atol=1e-5)
    assert packed.shape_only.untyped_storage().nbytes() <= 4


def test_bad_inputs_are_refused_by_name():
    packed = PackedWeight(torch.randn(8, 4), None)
    with pytest.raises(ValueError, match=r"float32 \[\.\.\., 4\]"):
        packed(torch.randn(2, 5))
    with pytest.raises(ValueError, match="float32"):
        packed(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D float32 CPU"):
        PackedWeight(torch.randn(8, 4).half(), None)
