"""KV blocks as wire frames: one block (every layer's K and V) is one contiguous frame.

Torch only, no zmq. The cache is [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
(baton.server.kv_cache), so `kv_cache[b]` is contiguous and ships as it lies in memory.
"""

from __future__ import annotations

import operator

import torch
import xxhash

from baton.server.dtypes import DTYPE_NAMES
from baton.server.dtypes import TORCH_DTYPES as DTYPES
from baton.server.wire.messages import KVLayout


def layout_of(kv_cache: torch.Tensor) -> KVLayout:
    _check_cache(kv_cache)
    _, num_layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    return KVLayout(
        num_layers=num_layers,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=DTYPE_NAMES[kv_cache.dtype],
    )


def block_frames(kv_cache: torch.Tensor, block_ids: list[int]) -> list[memoryview]:
    """One byte frame per block, in `block_ids` order.

    CPU: zero-copy views into the cache (they keep it alive; the bytes must not change until
    sent). CUDA: the blocks are gathered and copied to host memory once.
    """
    _check_cache(kv_cache)
    ids = _check_ids(kv_cache, block_ids)
    if kv_cache.device.type != "cpu":
        idx = torch.tensor(ids, dtype=torch.long, device=kv_cache.device)
        kv_cache = kv_cache.index_select(0, idx).cpu()
        ids = list(range(len(ids)))
    per_block = _block_nbytes(kv_cache)
    # NOTE: numpy has no bfloat16: view the bytes as uint8 before handing them to the buffer API.
    flat = memoryview(kv_cache.detach().view(torch.uint8).numpy()).cast("B")
    return [flat[b * per_block : (b + 1) * per_block] for b in ids]


def frames_checksum(frames) -> int:
    """64-bit XXH3 of the frames' bytes in order (bytes, memoryviews or zmq.Frame).

    NOTE: XXH3 hashes at memory speed (~20 GB/s); crc32 held the handoff to ~1.7 GB/s, since
    both ends hash every byte. It guards against corruption and mix-ups, not against an attacker.
    """
    h = xxhash.xxh3_64()
    for f in frames:
        h.update(getattr(f, "buffer", f))
    return h.intdigest()


def write_blocks(
    kv_cache: torch.Tensor,
    block_ids: list[int],
    frames,
    block_shape: list[int],
    dtype: str,
) -> None:
    """Copy one received frame into each `kv_cache[block_ids[i]]`.

    Everything is checked before the first byte is written, so a chunk that does not fit
    (dtype, block shape, frame count or size, block ids) raises ValueError and leaves the cache
    as it was.
    """
    _check_cache(kv_cache)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"unknown KV dtype {dtype!r}, expected one of {sorted(DTYPES)}")
    if DTYPES[dtype] != kv_cache.dtype:
        raise ValueError(f"KV dtype {dtype} differs from the cache's {DTYPE_NAMES[kv_cache.dtype]}")
    if list(block_shape) != list(kv_cache.shape[1:]):
        raise ValueError(
            f"KV block shape {list(block_shape)} differs from the cache's "
            f"{list(kv_cache.shape[1:])}"
        )
    ids = _check_ids(kv_cache, block_ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate block ids in {ids}")
    frames = list(frames)
    if len(frames) != len(ids):
        raise ValueError(f"{len(frames)} KV frames for {len(ids)} blocks")
    per_block = _block_nbytes(kv_cache)
    views = []
    for i, f in enumerate(frames):
        try:
            mv = memoryview(getattr(f, "buffer", f)).cast("B")  # zmq.Frame exposes .buffer
        except (TypeError, ValueError):
            raise ValueError(f"KV frame {i} is not a contiguous buffer") from None
        if mv.nbytes != per_block:
            raise ValueError(f"KV frame {i} has {mv.nbytes} bytes, a block has {per_block}")
        views.append(mv)
    if not views:
        return
    srcs = [torch.frombuffer(mv, dtype=torch.uint8) for mv in views]
    if kv_cache.device.type == "cpu":
        dst = kv_cache.view(torch.uint8).view(kv_cache.shape[0], per_block)
        for b, src in zip(ids, srcs, strict=True):
            dst[b].copy_(src)
        return
    # one host-to-device copy for the whole chunk
    staging = torch.empty((len(srcs), per_block), dtype=torch.uint8)
    for i, src in enumerate(srcs):
        staging[i].copy_(src)
    blocks = staging.to(kv_cache.device).view(kv_cache.dtype).view(len(ids), *kv_cache.shape[1:])
    kv_cache.index_copy_(0, torch.tensor(ids, dtype=torch.long, device=kv_cache.device), blocks)


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
        raise ValueError(
            "a KV cache is [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], "
            f"got shape {list(kv_cache.shape)}"
        )
    if kv_cache.dtype not in DTYPE_NAMES:
        raise ValueError(f"KV cache dtype {kv_cache.dtype} cannot travel the wire")
    if not kv_cache.is_contiguous():
        raise ValueError("the KV cache must be contiguous")


def _check_ids(kv_cache: torch.Tensor, block_ids) -> list[int]:
    ids = []
    for b in block_ids:
        if isinstance(b, bool):
            raise ValueError(f"block id {b!r} is not an integer")
        try:
            b = operator.index(b)
        except TypeError:
            raise ValueError(f"block id {b!r} is not an integer") from None
        if not 0 <= b < kv_cache.shape[0]:
            raise ValueError(f"block {b} is outside the cache of {kv_cache.shape[0]} blocks")
        ids.append(b)
    return ids


def _block_nbytes(kv_cache: torch.Tensor) -> int:
    return kv_cache[0].numel() * kv_cache.element_size()
