"""benchmarks/kernels.py's arithmetic on CPU: the decode step's memory floor and sizes, input
rotation, and FlexAttention's block mask over its pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from baton.bench.decode_baselines import flex_block_mask
from baton.bench.decode_step import plan_step, weight_read_bytes
from baton.bench.kernel_timing import rotations

ROOT = Path(__file__).resolve().parents[2]


def test_floor_leaves_out_the_embedding_and_counts_lm_head_once():
    untied = {"embed": (1, 100), "layer": (2, 40), "norm": (3, 1), "head": (4, 100)}
    assert weight_read_bytes(untied, "embed", "head", with_lm_head=True) == 141
    assert weight_read_bytes(untied, "embed", "head", with_lm_head=False) == 41
    tied = {"embed": (1, 100), "layer": (2, 40), "norm": (3, 1), "head": (1, 100)}
    assert weight_read_bytes(tied, "embed", "head", with_lm_head=True) == 141
    assert weight_read_bytes(tied, "embed", "head", with_lm_head=False) == 41


def test_step_plan_fits_the_context_and_the_largest_batch():
    p = plan_step(max_batch=256, context=1024, iters=20, block_size=16)
    assert p.max_model_len == 1024 + p.max_tokens
    assert p.max_tokens >= 16 + 3 + 20  # prefill steps, warm-up, timed steps
    assert p.num_kv_blocks >= 256 * p.max_model_len // 16


def test_rotations_cover_four_l2s():
    l2 = 60 << 20
    assert rotations(1 << 30, l2) == 1
    assert rotations(4 << 20, l2) == 60
    assert rotations(1, l2) == 64


def test_flex_block_mask_lists_each_sequence_own_pages():
    tables = torch.randperm(12, dtype=torch.int32).view(3, 4)
    dense = flex_block_mask(tables, 12).to_dense()  # [3, 1, 1, 12] blocks visited
    want = torch.zeros(3, 12, dtype=dense.dtype)
    want.scatter_(1, tables.long(), 1)
    assert torch.equal(dense[:, 0, 0], want)


def test_kernels_cli_help():
    r = subprocess.run(
        [sys.executable, "benchmarks/kernels.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "--output-dir" in r.stdout, r.stderr
