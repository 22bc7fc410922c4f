"""Kernel tests run compiled on CUDA and under the Triton interpreter elsewhere.

NOTE: the interpreter is chosen when a kernel is decorated, so TRITON_INTERPRET is set here,
before any test module imports baton.kernels (the root conftest does the same for the engine).
"""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 arithmetic is broken in the interpreter: it is checked on a GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# fp32 dots are exact in the interpreter but TF32 on a GPU.
ATOL = {
    torch.float32: 2e-2 if DEVICE == "cuda" else 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


@pytest.fixture
def device() -> str:
    return DEVICE


def poisoned(shape, dtype, device=DEVICE) -> torch.Tensor:
    """An output buffer full of NaN, so a slot the kernel forgot to write cannot pass."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
