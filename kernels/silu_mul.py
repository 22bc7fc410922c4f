"""silu(gate) * up for the gated MLP, in fp32, one program per (row, column tile)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from baton.kernels.launch import Launch
from baton.kernels.utils import check_runnable, next_pow2


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, s_gate, s_up, s_out, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gate_ptr + row * s_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * s_up + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * s_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # gate, up: [T, I], rows may be strided (halves of one gate_up projection) -> out: [T, I]
    if gate.dim() != 2 or gate.shape != up.shape:
        raise ValueError(
            f"gate and up must both be [T, I], got {tuple(gate.shape)} and {tuple(up.shape)}"
        )
    if gate.dtype != up.dtype or not gate.is_floating_point():
        raise ValueError(f"gate and up must share a float dtype, got {gate.dtype} and {up.dtype}")
    if gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError("gate and up need a contiguous last dim")
    if gate.device != up.device:
        raise ValueError(f"gate is on {gate.device} but up is on {up.device}")
    check_runnable(gate)
    T, N = gate.shape
    out = torch.empty(T, N, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    plan_silu_and_mul(gate, up, out).run()
    return out


def plan_silu_and_mul(gate, up, out) -> Launch:
    T, N = gate.shape
    block = min(next_pow2(N), 1024)
    return Launch(
        _silu_mul_kernel,
        (T, triton.cdiv(N, block)),
        (gate, up, out, gate.stride(0), up.stride(0), out.stride(0), N),
        dict(BLOCK=block),
        4 if block >= 1024 else 1,
    )


def silu_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
