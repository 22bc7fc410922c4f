"""MKL-packed float32 CPU linears: the same products as F.linear at every row count."""

from __future__ import annotations

import os
import subprocess
import sys

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


PACK_IN_A_FRESH_PROCESS = """
import torch
from baton.server.loader import empty_model
from baton.server.loader.dummy import init_dummy_weights
from baton.server.model_config import ModelConfig

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * {page}

cfg = ModelConfig.from_hf_dict(dict(
    model_type="llama", vocab_size=512, hidden_size=576, intermediate_size=1536,
    num_hidden_layers=16, num_attention_heads=9, num_key_value_heads=3,
    tie_word_embeddings=False,
))  # smollm2's layers, 216 MiB of them
model = empty_model(cfg, torch.float32, torch.device("cpu"))
init_dummy_weights(model, seed=0)
weights = sum(p.numel() * 4 for n, p in model.named_parameters() if "proj" in n)
before = rss()
assert model.pack_cpu_linears()
print(weights, rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_packing_a_model_does_not_keep_two_copies_of_its_weights():
    # A fresh interpreter: RSS in a process that ran other tests depends on their heap.
    script = PACK_IN_A_FRESH_PROCESS.format(page=os.sysconf("SC_PAGE_SIZE"))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    weights, growth = map(int, out.stdout.split())
    assert weights > 200 * 2**20
    # handing freed pages back leaves 0..0.4x (where threads put the buffers), without ~0.85x
    assert growth < 0.6 * weights
