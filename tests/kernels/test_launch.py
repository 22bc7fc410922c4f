"""Launch specs: what selects a compiled variant, and that serving-time values never do."""

from __future__ import annotations

import pytest
import torch

from baton.kernels.decode_attention import MAX_SPLITS, plan_decode
from baton.kernels.extend_attention import plan_extend
from baton.kernels.extend_config import SHARED_SLACK, launch_config, query_buckets, shared_bytes
from baton.kernels.launch import SHARED_MEMORY, shared_memory_limit, spec_key

HOPPER = (9, 0)


def _decode_launches(batch, width, num_splits, arch=HOPPER, h=32, hkv=8, d=128):
    q = torch.empty(batch, h, d, dtype=torch.bfloat16)
    cache = torch.empty(16, 2, 16, hkv, d, dtype=torch.bfloat16)
    tables = torch.zeros(batch + 3, width, dtype=torch.int32)[:batch]
    lens = torch.ones(batch, dtype=torch.int32)
    out = torch.empty_like(q)
    if num_splits == 1:
        partial = lse = out
    else:
        partial = torch.empty(batch, h, num_splits, d)
        lse = torch.empty(batch, h, num_splits)
    return plan_decode(q, cache[:, 0], cache[:, 1], tables, lens, 0.1, out, partial, lse, arch)


def test_split_count_and_step_shapes_never_change_the_decode_variant():
    stage1, merges = set(), set()
    for num_splits in range(1, MAX_SPLITS + 1):
        for batch, width in [(1, 1), (3, 7), (16, 16), (64, 33), (256, 512)]:
            plan = _decode_launches(batch, width, num_splits)
            stage1.add(plan[0].variant())
            merges.update(la.variant() for la in plan[1:])
            assert plan[0].grid == (batch, 8, num_splits)
    # One binary with a single split (it writes the output itself), one with several, one merge.
    assert len(stage1) == 2
    assert len(merges) == 1


def test_prefill_offsets_and_table_widths_never_change_the_extend_variant():
    h, hkv, d = 32, 8, 128
    variants = {}
    for nd in range(5):  # prefills sit after `nd` decodes: their table rows start unaligned
        for width in (1, 5, 16, 17, 64):
            for max_q in (1, 9, 16, 17, 40, 64, 100, 128, 4096):
                t = nd + 2
                q = torch.empty(t, h, d, dtype=torch.bfloat16)
                k = torch.empty(t, hkv, d, dtype=torch.bfloat16)
                cache = torch.empty(8, 2, 16, hkv, d, dtype=torch.bfloat16)
                tables = torch.zeros(t, width, dtype=torch.int32)
                lens = torch.ones(t, dtype=torch.int32)
                qsl = torch.zeros(3, dtype=torch.int32)
                la = plan_extend(
                    q[nd:], k[nd:], k[nd:], cache[:, 0], cache[:, 1], tables[nd:], qsl,
                    lens[nd:], max_q, 0.1, q[nd:], HOPPER,
                )  # fmt: skip
                variants.setdefault(la.constexprs["BLOCK_M"], set()).add(la.variant())
    # One variant per query bucket, whatever the batch brings.
    assert all(len(v) == 1 for v in variants.values())
    assert sorted(variants) == [16, 32, 64, 128]
    assert len(query_buckets(HOPPER, torch.bfloat16, d)) == len(variants)


def test_specialization_keys_follow_tritons_launcher():
    t = torch.empty(64, dtype=torch.int32)
    assert spec_key(t, False) == ("*i32", True)
    assert spec_key(t[1:], False) == ("*i32", False)  # 4 bytes in: not 16-byte aligned
    assert spec_key(t[1:], True) == ("*i32",)
    assert spec_key(32, False) == ("i32", True, False)
    assert spec_key(33, True) == ("i32",)
    assert spec_key(1 << 40, False)[0] == "i64"


@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_extend_tiles_fit_shared_memory_for_every_dtype(arch, dtype, head_dim):
    limit = shared_memory_limit(arch)
    for n in (16, 64, 128, 4096):
        bm, bn, warps, stages = launch_config(arch, dtype, head_dim, n)
        assert bm % bn == 0 and bm >= 16 and warps in (4, 8) and stages >= 1
        assert shared_bytes(bm, bn, stages, head_dim, dtype.itemsize) <= limit - SHARED_SLACK


def test_extend_keeps_fast_hopper_tiles_for_two_byte_types_and_shrinks_fp32():
    assert launch_config(HOPPER, torch.bfloat16, 128, 4096) == (128, 64, 8, 3)
    # fp32 with the same tiles would need 256 KiB against 227: one stage fewer fits.
    assert shared_bytes(128, 64, 3, 128, 4) > shared_memory_limit(HOPPER)
    assert launch_config(HOPPER, torch.float32, 128, 4096) == (128, 64, 8, 2)


def test_unknown_archs_take_the_nearest_older_limit():
    assert shared_memory_limit((10, 0)) == SHARED_MEMORY[(9, 0)]
    assert shared_memory_limit((8, 7)) == SHARED_MEMORY[(8, 6)]
    assert shared_memory_limit((7, 0)) == min(SHARED_MEMORY.values())
