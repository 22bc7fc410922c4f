"""Dtype names and their torch dtypes. The names (and sizes) are the wire's torch-free table;
this is the one mapping to torch."""

from __future__ import annotations

import torch

from baton.server.wire.messages import DTYPE_SIZES

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_SIZES}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
