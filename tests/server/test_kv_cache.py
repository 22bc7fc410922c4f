"""KV cache sizing: the CUDA budget from what this process can really use, and the block cap."""

from __future__ import annotations

import pytest
import torch

from baton.server.kv_cache import (
    activation_bytes,
    cuda_kv_budget,
    max_useful_blocks,
    num_blocks_for_budget,
)

GIB = 2**30
DEV = torch.device("cuda", 0)


def budget(free, total, reserved, allocated, util=0.9, activations=0):
    return cuda_kv_budget(
        DEV,
        util,
        activations,
        mem_get_info=lambda d: (free, total),
        memory_reserved=lambda d: reserved,
        memory_allocated=lambda d: allocated,
    )


def test_a_second_engine_in_one_process_still_gets_a_budget():
    # The first engine's cache was freed but stays cached by the allocator: mem_get_info
    # reports it used. 16 GiB of weights are still live; nothing else runs on the GPU.
    total = 140 * GIB
    reserved, allocated = 125 * GIB, 16 * GIB
    free = total - reserved - 1 * GIB  # 1 GiB of CUDA context outside the allocator
    got = budget(free, total, reserved, allocated)
    assert got == int(0.9 * total) - 1 * GIB - 16 * GIB
    # Reading mem_get_info alone (the old arithmetic) left nothing.
    assert max(0, int(0.9 * total) - (total - free)) == 0


def test_other_processes_and_activations_come_off_the_budget():
    total = 80 * GIB
    other = 30 * GIB  # another process on the same GPU
    free = total - other - 2 * GIB
    got = budget(free, total, reserved=2 * GIB, allocated=2 * GIB, activations=3 * GIB)
    assert got == int(0.9 * total) - other - 2 * GIB - 3 * GIB


def test_a_full_device_gives_zero_and_a_clear_error():
    got = budget(free=0, total=10 * GIB, reserved=0, allocated=0, util=0.5)
    assert got == 0
    try:
        num_blocks_for_budget(got, 4096)
    except ValueError as e:
        assert "smaller than one block" in str(e)
    else:
        raise AssertionError("a zero budget must be refused")


def test_activation_bound_grows_with_tokens_and_sequences():
    base = activation_bytes(4096, 14336, 6144, 128256, 8192, 256, 2)
    assert activation_bytes(4096, 14336, 6144, 128256, 16384, 256, 2) > base
    assert activation_bytes(4096, 14336, 6144, 128256, 8192, 512, 2) > base
    assert base < 3 * GIB  # a bound for 8k tokens of an 8B model, not the whole device


def test_block_count_is_capped_by_what_the_batch_can_use():
    assert max_useful_blocks(256, 8192, 16) == 2 * 256 * 512
    assert max_useful_blocks(1, 17, 16) == 4


def test_an_oversized_host_cache_fails_before_allocating_naming_the_flag(tiny_config_dir):
    from types import SimpleNamespace

    from baton.server.config import EngineConfig
    from baton.server.host_memory import Available
    from baton.server.kv_cache import block_bytes, plan_kv_cache

    mc = SimpleNamespace(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=1000, num_hidden_layers=2,
    )  # fmt: skip
    cpu = torch.device("cpu")
    cfg = EngineConfig(model=str(tiny_config_dir), kv_cache_gib=2.0)
    per_block = block_bytes(2, cfg.block_size, 2, 16, torch.float32)
    roomy = Available(64 * GIB, "MemAvailable")
    n = plan_kv_cache(cfg, mc, torch.float32, cpu, 256, roomy)
    assert n == min(2 * GIB // per_block, max_useful_blocks(cfg.max_num_seqs, 256, 16))
    tight = Available(n * per_block - 1, "MemAvailable")
    with pytest.raises(ValueError, match="--kv-cache-gib"):
        plan_kv_cache(cfg, mc, torch.float32, cpu, 256, tight)
    fixed = EngineConfig(model=str(tiny_config_dir), num_kv_blocks=10**8)  # 800 GB
    with pytest.raises(ValueError, match="num_kv_blocks"):
        plan_kv_cache(fixed, mc, torch.float32, cpu, 256, roomy)


def test_the_host_cache_is_resident_from_the_start():
    from baton.server.host_memory import resident_bytes
    from baton.server.kv_cache import allocate_kv_cache

    c = allocate_kv_cache(64, 2, 16, 2, 64, torch.float32, "cpu")  # 2 MiB
    assert resident_bytes(c.data_ptr(), c.nbytes) == c.nbytes
    assert not c.any()
