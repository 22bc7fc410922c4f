"""The paged KV cache tensor and its sizing from a memory budget."""

from __future__ import annotations

import logging

import torch

from baton.server import host_memory

logger = logging.getLogger(__name__)

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
    # NOTE: written once here, so every page is resident from the start. An untouched host
    # cache cost no RSS until traffic reached it, so a worker's RSS climbed for as long as new
    # blocks were first used, and no one could tell that from a leak; and an oversized budget
    # surfaced as the OOM killer mid-run instead of an error at start (see `plan_kv_cache`).
    # Backends still read only slots written earlier (the torch backend's test poisons the
    # cache to prove it).
    return torch.zeros(
        num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
    )


def num_blocks_for_budget(budget_bytes: int, per_block: int) -> int:
    n = budget_bytes // per_block
    if n < 1:
        raise ValueError(
            f"kv cache budget of {budget_bytes} bytes is smaller than one block ({per_block} bytes)"
        )
    return int(n)


def cuda_kv_budget(
    device: torch.device,
    gpu_memory_utilization: float,
    activation_bytes: int,
    mem_get_info=None,
    memory_reserved=None,
    memory_allocated=None,
) -> int:
    """Bytes the cache may take: the utilization fraction of the device, less what others use,
    less what this process holds, less room for a step's activations.

    NOTE: `mem_get_info` counts what PyTorch's allocator has cached (reserved, free for reuse)
    as used, so a second engine in one process would see no room; memory held by other
    processes and the CUDA context is (total - free) - reserved, and only this process's live
    tensors (weights, another engine's cache) are really taken.
    """
    mem_get_info = mem_get_info or torch.cuda.mem_get_info
    memory_reserved = memory_reserved or torch.cuda.memory_reserved
    memory_allocated = memory_allocated or torch.cuda.memory_allocated
    free, total = mem_get_info(device)
    others = max(0, (total - free) - memory_reserved(device))
    mine = memory_allocated(device)
    return max(0, int(total * gpu_memory_utilization) - others - mine - activation_bytes)


def activation_bytes(
    hidden: int,
    intermediate: int,
    qkv_width: int,
    vocab: int,
    max_tokens: int,
    max_seqs: int,
    itemsize: int,
) -> int:
    """A bound on one step's live activations: two layers' worth of hidden states, the qkv and
    gate-up projections for every scheduled token, and fp32 logits (with their softmax) for
    every sequence."""
    per_token = 3 * hidden + qkv_width + 3 * intermediate
    return 2 * max_tokens * per_token * itemsize + 2 * max_seqs * vocab * 4


def max_useful_blocks(max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    """Blocks past this are never needed at once: every sequence at its longest, twice over
    (the second half keeps prefixes cached). A tiny model on a large GPU would otherwise get
    millions of blocks, each a Python object in the block manager."""
    return 2 * max_num_seqs * -(-max_model_len // block_size)


def _activations(config, mc, max_model_len: int, itemsize: int) -> int:
    return activation_bytes(
        mc.hidden_size,
        mc.intermediate_size,
        (mc.num_attention_heads + 2 * mc.num_key_value_heads) * mc.head_dim,
        mc.vocab_size,
        max(config.max_num_batched_tokens, max_model_len),
        config.max_num_seqs,
        itemsize,
    )


def size_kv_cache(config, mc, dtype: torch.dtype, device: torch.device, max_model_len: int) -> int:
    """Blocks for an engine with `config` (an EngineConfig) serving a model with config `mc`:
    what the budget holds (`kv_cache_gib` on CPU; on CUDA, what the device has left after the
    weights and a step's activations), capped at `max_useful_blocks`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type != "cuda":
        budget = int(config.kv_cache_gib * 2**30)
    else:
        activations = _activations(config, mc, max_model_len, itemsize)
        budget = cuda_kv_budget(device, config.gpu_memory_utilization, activations)
    per_block = block_bytes(
        mc.num_hidden_layers, config.block_size, mc.num_key_value_heads, mc.head_dim, dtype
    )
    budgeted = num_blocks_for_budget(budget, per_block)
    useful = max_useful_blocks(config.max_num_seqs, max_model_len, config.block_size)
    if useful < budgeted:
        logger.info(
            "KV cache: %d blocks fit the budget; keeping %d (every sequence at its longest, "
            "twice over)",
            budgeted,
            useful,
        )
    return min(budgeted, useful)


def plan_kv_cache(
    config, mc, dtype: torch.dtype, device: torch.device, max_model_len: int, avail=None
) -> int:
    """The engine's block count: `num_kv_blocks` where set, else `size_kv_cache`. A host cache
    must fit what the machine and its cgroup have left (`host_memory.available`, or `avail`)
    with a step's activations beside it, or this raises ValueError naming the flag."""
    n = config.num_kv_blocks or size_kv_cache(config, mc, dtype, device, max_model_len)
    if device.type != "cuda":
        per_block = block_bytes(
            mc.num_hidden_layers, config.block_size, mc.num_key_value_heads, mc.head_dim, dtype
        )
        itemsize = torch.empty((), dtype=dtype).element_size()
        reserve = _activations(config, mc, max_model_len, itemsize)
        flag = "num_kv_blocks" if config.num_kv_blocks else "--kv-cache-gib (kv_cache_gib)"
        host_memory.check_fits(n * per_block, reserve, flag, avail)
    return n
