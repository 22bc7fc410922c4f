"""Applying allowed-token bitmasks to logits (llguidance's layout: bit t % 32 of int32 word
t // 32 is token t)."""

from __future__ import annotations

import numpy as np
import torch


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [N, vocab] from int32 [N, ceil(vocab / 32)] (on the bitmask's device)."""
    if bitmask.device.type == "cpu":
        # NOTE: numpy unpacks bits ~20x faster than shifts and masks in torch on CPU.
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, :vocab]).bool()
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [N, W, 32], bit 0 first
    return bits.flatten(1)[:, :vocab].bool()


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` [N, V] with the tokens each of `rows` does not allow set to -inf."""
    if logits.device.type != "cpu":
        bitmask = bitmask.to(logits.device, non_blocking=True)
    allowed = allowed_tokens(bitmask, logits.shape[1]).to(logits.device, non_blocking=True)
    if rows.numel() == logits.shape[0]:  # every row constrained (rows are in order)
        return logits.masked_fill(~allowed, float("-inf"))
    sub = logits.index_select(0, rows).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, rows, sub)
