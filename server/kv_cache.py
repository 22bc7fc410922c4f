"""The paged KV cache tensor and its sizing from a memory budget."""

from __future__ import annotations

import torch

# NOTE: one block holds every layer's K and V contiguously, so a block ships as one chunk.
# Layout: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim].


def block_bytes(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize


def allocate_kv_cache(
    num_blocks: int,
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    # NOTE: left uninitialised on purpose: backends read only slots written earlier (the torch
    # backend's test poisons the cache to prove it), and untouched host pages cost no RSS.
    return torch.empty(
        num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
    )


def num_blocks_for_budget(budget_bytes: int, per_block: int) -> int:
    n = budget_bytes // per_block
    if n < 1:
        raise ValueError(
            f"kv cache budget of {budget_bytes} bytes is smaller than one block ({per_block} bytes)"
        )
    return int(n)


def cuda_kv_budget(device: torch.device, gpu_memory_utilization: float) -> int:
    """Bytes the cache may take: the utilization fraction of total memory, minus what is in use."""
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    return max(0, int(total * gpu_memory_utilization) - used)
