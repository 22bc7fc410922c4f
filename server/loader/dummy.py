"""Seeded random weights, for benchmarks and tests without a checkpoint."""

from __future__ import annotations

import torch
from torch import nn

INIT_STD = 0.02  # HF's initializer_range default


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Normal(0, 0.02) matrices, zero biases, norms at 1.

    NOTE: drawn on the host from one generator in parameter order, then copied, so the weights
    depend on the seed only, never on the device.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.copy_(torch.empty(param.shape).normal_(0.0, INIT_STD, generator=gen))
