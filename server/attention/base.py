"""The attention backend interface: one metadata layout per step, one call per layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """What every backend needs to know about one step, built once and shared by all layers.

    Tokens of the step are flattened: sequence `i` owns rows
    `query_start_loc[i]:query_start_loc[i+1]`
    of q/k/v. Its earlier tokens (prefix hits, previous chunks, decoded tokens) already sit in the
    paged cache; after the new K/V are written, its context is `seq_lens[i]` tokens long, the new
    ones last. Decode-only sequences (one new token) come first in the batch, then prefills.
    """

    # Device tensors.
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, block * block_size + offset for each new token
    # Host copies, so a reference backend can loop without syncing the device.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    num_decodes: int  # the first num_decodes sequences have exactly one new token
    max_seq_len: int
    block_size: int
    # Filled by AttentionBackend.prepare(); each backend keeps its own extras here.
    extras: dict

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens_cpu))


class AttentionBackend(ABC):
    """Paged attention over a KV cache of shape
    [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]: one block holds every layer."""

    name: str = ""

    def prepare(self, meta: AttentionMetadata) -> None:  # noqa: B027 - optional hook
        """Precompute per-step extras (index tensors, split counts) once for all layers."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        layer_cache: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim] (a view)
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Write k/v into `layer_cache` at `meta.slot_mapping`, then attend causally."""


@dataclass
class ForwardContext:
    """Everything a model's forward pass needs beyond the token ids, passed explicitly."""

    backend: AttentionBackend
    meta: AttentionMetadata
    kv_cache: torch.Tensor  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    # Norms, rotary and SiLU-and-mul through the Triton kernels (with the triton backend).
    fused_ops: bool = False

    def layer_cache(self, layer: int) -> torch.Tensor:
        return self.kv_cache[:, layer]
