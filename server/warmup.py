"""Compile every kernel variant a serving step can reach, before the first request.

Triton compiles a kernel the first time it meets a new variant (constexprs, warps, stages,
argument specializations); at serving time that stalls every request in the batch for
seconds. The variants a step can reach are few and known (see `baton.kernels.variants`):
each query-length bucket of the extend kernel, and decode with one split and with several.
One eager step of each, at start, compiles them all; the steps write no KV (slot -1).
"""

from __future__ import annotations

import logging
import time

import torch

from baton.kernels import decode_attention, extend_attention, rmsnorm, rotary, silu_mul, store_kv
from baton.kernels.extend_config import query_buckets
from baton.kernels.launch import arch_of
from baton.kernels.utils import interpreting
from baton.server.attention.base import AttentionBackend, AttentionMetadata, ForwardContext
from baton.server.attention.metadata import build_attention_metadata

logger = logging.getLogger(__name__)

KERNELS = (
    decode_attention._decode_stage1,
    decode_attention._decode_merge,
    extend_attention._extend_attention_kernel,
    rmsnorm._rms_norm_kernel,
    rotary._rotary_kernel,
    silu_mul._silu_mul_kernel,
    store_kv._store_kv_kernel,
)


def compiled_binaries() -> int:
    """How many binaries Triton has compiled (or loaded from its cache) for our kernels in this
    process; 0 under the interpreter, which compiles nothing."""
    total = 0
    for kernel in KERNELS:
        for entry in getattr(kernel, "device_caches", {}).values():
            total += len(entry[0])  # (kernel_cache, ...) per device
    return total


def _meta(query_lens, seq_len, block_size, device, num_splits=None) -> AttentionMetadata:
    """A step of fresh sequences (each as long as its query) over block 0, writing no KV."""
    width = -(-seq_len // block_size)
    meta = build_attention_metadata(
        query_lens, list(query_lens), [[0] * width] * len(query_lens), block_size, device
    )
    meta.slot_mapping.fill_(-1)  # NOTE: slot -1 writes nowhere: the cache stays as it was
    if num_splits is not None:
        meta.extras["num_splits"] = num_splits
    return meta


@torch.inference_mode()
def compile_kernels(
    model: torch.nn.Module,
    backend: AttentionBackend,
    kv_cache: torch.Tensor,
    block_size: int,
    max_tokens: int,
    max_model_len: int,
    fused_ops: bool,
) -> int:
    """Run one eager step per reachable variant; returns how many binaries that compiled."""
    device, dtype = kv_cache.device, kv_cache.dtype
    arch = None if interpreting() else arch_of(device)
    head_dim = kv_cache.shape[-1]
    before, t0 = compiled_binaries(), time.perf_counter()
    # A decode with one split (it writes its output itself), one with several (and the merge),
    # then a prefill per query bucket behind a decode (as mixed steps put them).
    steps = [([1], 1, 1), ([1, 1], 1, 2)]
    longest = min(max_tokens - 1, max_model_len)  # the longest prefill a step can hold
    prev = 0
    for n in query_buckets(arch, dtype, head_dim):  # bucket n serves lengths prev+1..n
        if longest > prev:
            steps.append(([1, min(n, longest)], min(n, longest), None))
        prev = n
    for query_lens, seq_len, splits in steps:
        meta = _meta(query_lens, seq_len, block_size, device, splits)
        backend.prepare(meta)
        ids = torch.zeros(sum(query_lens), dtype=torch.long, device=device)
        pos = torch.cat([torch.arange(q, device=device) for q in query_lens])
        model(ids, pos, ForwardContext(backend, meta, kv_cache, fused_ops))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compiled = compiled_binaries() - before
    logger.info(
        "compiled %d kernel variants in %.1f s (%d warm-up steps)",
        compiled,
        time.perf_counter() - t0,
        len(steps),
    )
    return compiled
