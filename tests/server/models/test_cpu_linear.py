"""Float32 CPU linear kernels: each gives F.linear's products at every row count, and a packed
one lets the unpacked weight go."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from baton.server.models import cpu_linear
from baton.server.models.cpu_linear import KERNELS, PACK_ROWS, PlannedLinear, available


def test_the_cpu_wheel_has_every_kernel():
    # x86-64 CPU wheels ship MKL and oneDNN; losing one loses the host's fastest choice
    assert tuple(KERNELS) == available()
    assert cpu_linear.is_cpu_float32(torch.ones(2, 2))
    assert not cpu_linear.is_cpu_float32(torch.ones(2, 2, dtype=torch.bfloat16))


def test_importing_the_kernels_runs_none_of_them():
    code = "from baton.server.models import cpu_linear as c; print(c.available.cache_info().misses)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


@pytest.mark.parametrize("kernel", available())
@pytest.mark.parametrize("bias", [False, True])
def test_every_kernel_gives_f_linear_at_every_row_count(kernel, bias):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 40, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    fn = KERNELS[kernel][1](w, b)
    for rows in (0, 1, 2, 5, PACK_ROWS - 1, PACK_ROWS, PACK_ROWS + 1, 3 * PACK_ROWS + 7):
        x = torch.randn(rows, 40, generator=gen)
        got = fn(x)
        assert got.shape == (rows, 96)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # leading dimensions are rows too, and a strided input is read as its values
    x = torch.randn(3, 4, 40, generator=gen)
    torch.testing.assert_close(fn(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    xt = torch.randn(40, 6, generator=gen).t()
    torch.testing.assert_close(fn(xt), F.linear(xt, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["mkl-packed", "onednn-packed"])
def test_a_packed_copy_does_not_hold_the_original(kernel):
    w = torch.randn(64, 32)
    fn = KERNELS[kernel][1](w, None)
    x = torch.randn(4, 32)
    want = F.linear(x, w)
    w.fill_(float("nan"))  # whatever happens to the original later, the product stays
    torch.testing.assert_close(fn(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["mkl-packed", "onednn", "onednn-packed"])
def test_bad_inputs_are_refused_by_name(kernel):
    build = KERNELS[kernel][1]
    fn = build(torch.randn(8, 4), None)
    with pytest.raises(ValueError, match=r"float32 \[\.\.\., 4\]"):
        fn(torch.randn(2, 5))
    with pytest.raises(ValueError, match="float32"):
        fn(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D float32 CPU weight"):
        build(torch.randn(8, 4).half(), None)


def test_a_planned_linear_runs_each_row_count_through_its_kernel(monkeypatch):
    calls = []

    def recording(name):
        def build(w, b):
            return lambda x: calls.append((name, x.shape[0])) or F.linear(x, w, b)

        return build

    for name in ("dense", "mkl-packed"):
        monkeypatch.setitem(KERNELS, name, (KERNELS[name][0], recording(name)))
    w = torch.randn(8, 4)
    planned = PlannedLinear(w, None, ((1, "dense"), (3, "mkl-packed")))
    for rows in (0, 1, 2, 3, 50):
        x = torch.randn(rows, 4)
        torch.testing.assert_close(planned(x), F.linear(x, w))
    assert calls == [
        ("dense", 0),
        ("dense", 1),
        ("dense", 2),
        ("mkl-packed", 3),
        ("mkl-packed", 50),
    ]


# A fresh interpreter, as RSS in a process that ran other tests depends on their heap: smollm2's
# layers (216 MiB of float32 weights) packed, keeping the unpacked copies or freeing them.
PACK_IN_A_FRESH_PROCESS = """
import json, sys
import torch
from baton.server.loader import empty_model
from baton.server.loader.dummy import init_dummy_weights
from baton.server.model_config import ModelConfig
from baton.server.models.cpu_linear import KERNELS, return_freed_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * {page}

kernel, keep = sys.argv[1], sys.argv[2] == "keep"
cfg = ModelConfig.from_hf_dict(dict(
    model_type="llama", vocab_size=512, hidden_size=576, intermediate_size=1536,
    num_hidden_layers=16, num_attention_heads=9, num_key_value_heads=3,
    tie_word_embeddings=False,
))
model = empty_model(cfg, torch.float32, torch.device("cpu"))
init_dummy_weights(model, seed=0)
weights = sum(p.numel() * 4 for n, p in model.named_parameters() if "proj" in n)
before = rss()
if keep:  # the packed copies beside the unpacked weights: what the copies alone cost
    copies = [KERNELS[kernel][1](w, None) for w, _ in model.cpu_linear_units()]
    return_freed_memory()
else:
    assert model.use_cpu_linear_plan(((1, kernel),), keeps_dense=False)
print(json.dumps({{"weights": weights, "growth": rss() - before}}))
"""


def rss_growth(kernel: str, keep: bool) -> dict:
    script = PACK_IN_A_FRESH_PROCESS.format(page=os.sysconf("SC_PAGE_SIZE"))
    out = subprocess.run(
        [sys.executable, "-c", script, kernel, "keep" if keep else "free"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("kernel", ["mkl-packed", "onednn-packed"])
def test_packing_a_model_gives_its_unpacked_weights_back(kernel):
    # How much memory a packed copy takes depends on the CPU's kernels (padding, block sizes):
    # so compare with the same copies made while the unpacked weights stay. Freeing them must
    # hand at least half their bytes back to the OS (in practice ~all: glibc keeps freed heap
    # pages unless trimmed, which kept ~85% of them resident).
    kept, freed = rss_growth(kernel, keep=True), rss_growth(kernel, keep=False)
    weights = kept["weights"]
    assert weights > 200 * 2**20
    assert kept["growth"] > 0.5 * weights  # the copies are real memory
    assert freed["growth"] < kept["growth"] - 0.5 * weights
