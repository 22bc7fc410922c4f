"""KV blocks as wire frames: one block (every layer's K and V) is one contiguous frame."""

from __future__ import annotations

import zlib

import torch

from baton.server.wire.messages import KVLayout

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def layout_of(kv_cache: torch.Tensor) -> KVLayout:
    # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    _, layers, _, block_size, heads, head_dim = kv_cache.shape
    return KVLayout(layers, block_size, heads, head_dim, DTYPE_NAMES[kv_cache.dtype])


def block_frames(kv_cache: torch.Tensor, block_ids: list[int]) -> list[memoryview]:
    """One frame per block: zero-copy views on CPU; one device-to-host copy on CUDA."""
    if kv_cache.device.type != "cpu":
        idx = torch.tensor(block_ids, device=kv_cache.device)
        kv_cache = kv_cache.index_select(0, idx).cpu()
        block_ids = list(range(len(block_ids)))
    raw = kv_cache.view(torch.uint8)  # numpy has no bfloat16; bytes are bytes
    return [memoryview(raw[b].numpy()).cast("B") for b in block_ids]


def frames_checksum(frames) -> int:
    crc = 0
    for f in frames:
        crc = zlib.crc32(f, crc)
    return crc


def write_blocks(
    kv_cache: torch.Tensor, block_ids: list[int], frames, block_shape: list[int], dtype: str
) -> None:
    """Copy received frames into `kv_cache[block_ids]`, after checking they fit exactly."""
    if DTYPES.get(dtype) is not kv_cache.dtype:
        raise ValueError(f"KV dtype {dtype!r} differs from the cache's {kv_cache.dtype}")
    if list(block_shape) != list(kv_cache.shape[1:]):
        raise ValueError(f"KV block shape {block_shape} differs from {list(kv_cache.shape[1:])}")
    if len(frames) != len(block_ids):
        raise ValueError(f"{len(frames)} frames for {len(block_ids)} blocks")
    per_block = kv_cache[0].numel() * kv_cache.element_size()
    for b, frame in zip(block_ids, frames, strict=True):
        if memoryview(frame).nbytes != per_block:
            raise ValueError(f"a KV frame has {memoryview(frame).nbytes} bytes, want {per_block}")
        if not 0 <= b < kv_cache.shape[0]:
            raise ValueError(f"block {b} is outside the cache")
        src = torch.frombuffer(frame, dtype=torch.uint8).view(kv_cache.dtype)
        kv_cache[b].copy_(src.view(kv_cache.shape[1:]))
