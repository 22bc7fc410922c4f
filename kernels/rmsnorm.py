"""RMSNorm, plain and fused with the residual add, one program per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.launch import Launch
from baton.kernels.utils import check_runnable, next_pow2

# NOTE: a row wider than this is walked in chunks, twice: sum of squares, then normalise.
_MAX_BLOCK = 4096


@triton.jit
def _input_row(x_ptr, res_ptr, out_ptr, row, s_x, s_res, cols, mask, HAS_RES: tl.constexpr):
    """x (+ residual, rounded to the model dtype as layers.RMSNorm adds in it), in fp32."""
    h = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * s_res + cols, mask=mask, other=0.0).to(tl.float32)
        h = (h + r).to(out_ptr.dtype.element_ty).to(tl.float32)
    return h


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    s_x, s_res, s_out, s_res_out, N, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        h = _input_row(x_ptr, res_ptr, out_ptr, row, s_x, s_res, cols, mask, HAS_RES)
        if HAS_RES:
            tl.store(res_out_ptr + row * s_res_out + cols, h.to(dtype), mask=mask)
        acc += h * h
    rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        # NOTE: the sum is recomputed from the inputs, not re-read from res_out: no barrier needed
        h = _input_row(x_ptr, res_ptr, out_ptr, row, s_x, s_res, cols, mask, HAS_RES)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        # weight * normed.to(dtype): the same two roundings as layers.RMSNorm
        y = w * (h * rstd).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * s_out + cols, y.to(dtype), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    if x.dim() != 2 or weight.shape != (x.shape[-1],):
        raise ValueError(
            f"x must be [T, N] and weight [N], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must match x {tuple(x.shape)}, got {tuple(residual.shape)}")
    tensors = [x, weight] + ([] if residual is None else [residual])
    if not x.is_floating_point() or any(t.dtype != x.dtype for t in tensors):
        raise ValueError(
            f"x, weight and residual must share a float dtype, got {[t.dtype for t in tensors]}"
        )
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("x, weight and residual need a contiguous last dim")
    if any(t.device != x.device for t in tensors):
        raise ValueError("x, weight and residual must be on one device")
    check_runnable(x)


def plan_rms_norm(x, residual, weight, eps, out, res_out) -> Launch:
    T, N = x.shape
    block = min(next_pow2(N), _MAX_BLOCK)
    has_res = residual is not None
    return Launch(
        _rms_norm_kernel,
        (T,),
        (
            x,
            residual if has_res else x,
            weight,
            out,
            res_out if has_res else out,
            x.stride(0),
            residual.stride(0) if has_res else 0,
            out.stride(0),
            res_out.stride(0) if has_res else 0,
            N,
            eps,
        ),  # fmt: skip
        dict(HAS_RES=has_res, BLOCK=block),
        min(max(block // 256, 1), 8),
    )


def _launch(x, residual, weight, eps, out, res_out) -> None:
    plan_rms_norm(x, residual, weight, eps, out, res_out).run()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, N], weight: [N] -> [T, N] in x.dtype
    _check(x, weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # x, residual: [T, N], weight: [N] -> (rms_norm(x + residual), x + residual)
    _check(x, weight, residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, out, res_out)
    return out, res_out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_ref(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return rms_norm_ref(s, weight, eps), s
