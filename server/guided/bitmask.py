"""Applying allowed-token bitmasks to logits (llguidance's layout: bit t % 32 of int32 word
t // 32 is token t), in plain torch so CPU and CUDA take the same path."""

from __future__ import annotations

import torch


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [N, vocab] from int32 [N, ceil(vocab / 32)]."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [N, W, 32], bit 0 first
    return bits.flatten(1)[:, :vocab].bool()


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` [N, V] with the tokens each of `rows` does not allow set to -inf."""
    allowed = allowed_tokens(bitmask.to(logits.device, non_blocking=True), logits.shape[1])
    sub = logits.index_select(0, rows).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, rows, sub)
