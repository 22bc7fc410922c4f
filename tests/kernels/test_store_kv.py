"""store_kv against explicit slot expectations and its torch reference, on a NaN-poisoned cache."""

from __future__ import annotations

import pytest
import torch

from baton.kernels.store_kv import store_kv, store_kv_ref
from tests.kernels.conftest import DEVICE, DTYPES, poisoned

NB, NL, BS = 8, 3, 4
LAYER = 1
# scattered, non-increasing blocks; -1 is CUDA-graph padding
SLOTS = [5 * BS + 1, 2 * BS + 3, 7 * BS + 0, 2 * BS + 0, -1, 0 * BS + 2, 5 * BS + 2, -1, 1 * BS + 3]


def _inputs(dtype, hkv, d, slots=SLOTS, strided=False, seed=0):
    # -> k, v: [T, Hkv, D]; kv: [NB, NL, 2, BS, Hkv, D] all NaN; slot_mapping: [T]
    g = torch.Generator().manual_seed(seed)
    T = len(slots)
    if strided:  # k and v as views of one [T, (2 + 1) * Hkv * D] projection, rows strided
        kvx = torch.randn(T, 3 * hkv * d, generator=g).to(DEVICE, dtype)
        k, v = kvx[:, : hkv * d].view(T, hkv, d), kvx[:, 2 * hkv * d :].view(T, hkv, d)
    else:
        k = torch.randn(T, hkv, d, generator=g).to(DEVICE, dtype)
        v = torch.randn(T, hkv, d, generator=g).to(DEVICE, dtype)
    kv = poisoned((NB, NL, 2, BS, hkv, d), dtype)
    return k, v, kv, torch.tensor(slots, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hkv,d,strided", [(2, 64, False), (3, 16, True)])
def test_store_kv_writes_exactly_the_slots(dtype, hkv, d, strided):
    k, v, kv, slots = _inputs(dtype, hkv, d, strided=strided)
    store_kv(k, v, kv[:, LAYER, 0], kv[:, LAYER, 1], slots)
    written = torch.zeros(NB, NL, 2, BS, dtype=torch.bool, device=DEVICE)
    for t, s in enumerate(SLOTS):
        if s < 0:
            continue
        assert torch.equal(kv[s // BS, LAYER, 0, s % BS], k[t])
        assert torch.equal(kv[s // BS, LAYER, 1, s % BS], v[t])
        written[s // BS, LAYER, :, s % BS] = True
    assert kv[written].isfinite().all()
    assert kv[~written].isnan().all()

    expected = poisoned(kv.shape, dtype)
    store_kv_ref(k, v, expected[:, LAYER, 0], expected[:, LAYER, 1], slots)
    torch.testing.assert_close(kv, expected, rtol=0, atol=0, equal_nan=True)


def test_store_kv_all_padding_writes_nothing():
    k, v, kv, slots = _inputs(torch.float32, 2, 16, slots=[-1, -1, -1])
    store_kv(k, v, kv[:, LAYER, 0], kv[:, LAYER, 1], slots)
    assert kv.isnan().all()


def _bad_inputs():
    k, v, kv, slots = _inputs(torch.float32, 2, 16)
    kc, vc = kv[:, LAYER, 0], kv[:, LAYER, 1]
    yield "shapes", (k, v[:, :1], kc, vc, slots)
    yield "cache", (k, v, kc[..., :8], vc[..., :8], slots)
    yield "slot dtype", (k, v, kc, vc, slots.int())
    yield "slot len", (k, v, kc, vc, slots[:-1])
    yield "dtypes", (k.half(), v.half(), kc, vc, slots)
    yield "last dim", (k.transpose(1, 2).contiguous().transpose(1, 2), v, kc, vc, slots)


@pytest.mark.parametrize("case", list(_bad_inputs()), ids=lambda c: c[0])
def test_store_kv_rejects_bad_inputs(case):
    with pytest.raises(ValueError):
        store_kv(*case[1])
