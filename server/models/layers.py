"""Layers shared by the model family: Linear, RMSNorm, rotary embedding, gated SiLU."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from baton.server.models.cpu_linear import PlannedLinear

Rope = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Linear(nn.Linear):
    """nn.Linear whose float32 CPU products can go through the kernels of a plan, by row count
    (see cpu_linear and cpu_linear_plan)."""

    planned: PlannedLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.planned is not None:
            return self.planned(x)
        return F.linear(x, self.weight, self.bias)

    def use_plan(self, ranges: tuple[tuple[int, str], ...], release: bool) -> None:
        """Multiply through the plan's kernels from now on; `release` frees the weight as it is
        (the plan keeps only packed forms; leave it where another module shares the tensor, as
        a tied head does)."""
        self.planned = PlannedLinear(self.weight, self.bias, ranges)
        if release:
            _release(self.weight)


def _release(param: torch.Tensor) -> None:
    param.data = torch.empty(0, dtype=param.dtype, device=param.device)


class FusedRows:
    """Linears that read the same input, run as one GEMM over their stacked weights.

    NOTE: the linears' parameters become row views of the stacked tensors, so they keep their
    HF names (loading is unchanged: a copy into a view fills the stack) and no memory is
    doubled. Build it after the parameters have their final device and dtype: moving them
    later would give them storage of their own and leave the stack stale.
    """

    def __init__(self, *linears: nn.Linear) -> None:
        self.sizes = [m.out_features for m in linears]
        self.weight = self._stack([m.weight for m in linears])
        has_bias = [m.bias is not None for m in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("fused linears must all have a bias or none")
        self.bias = self._stack([m.bias for m in linears]) if all(has_bias) else None
        self.linears = linears
        self.planned: PlannedLinear | None = None

    @staticmethod
    def _stack(params: list[nn.Parameter]) -> torch.Tensor:
        stacked = torch.cat([p.detach() for p in params])
        start = 0
        for p in params:
            p.data = stacked[start : start + p.shape[0]]
            start += p.shape[0]
        return stacked

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.planned is not None:
            return self.planned(x).split(self.sizes, dim=-1)
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)

    def use_plan(self, ranges: tuple[tuple[int, str], ...], release: bool) -> None:
        """Multiply the stack through the plan's kernels; `release` frees the stack (the
        linears' weights become empty; the biases stay)."""
        self.planned = PlannedLinear(self.weight, self.bias, ranges)
        if release:
            for m in self.linears:
                _release(m.weight)
            self.weight = None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 like HF, cast back.

    With `residual` it is the fused-add form: returns (norm(x + residual), x + residual).
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, fused: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if fused:  # the Triton kernels: one pass over x (and the residual)
            from baton.kernels import rmsnorm

            if residual is None:
                return rmsnorm.rms_norm(x, self.weight, self.eps)
            return rmsnorm.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32:  # one kernel, the same arithmetic as below
            out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
            return out if residual is None else (out, residual)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)


class SiluAndMul(nn.Module):
    """silu(gate) * up. NOTE: gate and up come apart, as HF names keep them two projections."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:
            from baton.kernels.silu_mul import silu_and_mul

            return silu_and_mul(gate, up)
        return F.silu(gate) * up


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, the same arithmetic as transformers."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = "default" if scaling is None else scaling["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope_type {rope_type!r} is not supported")


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate_half, as HF Llama) from a cos/sin cache indexed by position."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        # NOTE: fp32 whatever the model dtype, non-persistent; `reset_cache` rebuilds it in
        # place after `to_empty`.
        self.register_buffer("cos_cache", torch.empty(0), persistent=False)
        self.register_buffer("sin_cache", torch.empty(0), persistent=False)
        self.reset_cache()

    def reset_cache(self) -> None:
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        pos = torch.arange(self.max_positions, dtype=torch.int64, device="cpu").float()
        freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2], computed on the host
        self.cos_cache = freqs.cos().to(self.cos_cache.device)
        self.sin_cache = freqs.sin().to(self.sin_cache.device)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, 1, D] in `dtype`, broadcasting over heads
        cos = self.cos_cache[positions].repeat(1, 2).to(dtype)
        sin = self.sin_cache[positions].repeat(1, 2).to(dtype)
        return cos[:, None, :], sin[:, None, :]

    def bind(self, positions: torch.Tensor, dtype: torch.dtype, fused: bool = False) -> Rope:
        """The rotation of one step, `(q, k) -> (q, k)`, with its per-position work done once."""
        if fused:
            from baton.kernels.rotary import apply_rotary as rotary_kernel

            cos_cache, sin_cache = self.cos_cache, self.sin_cache
            return lambda q, k: rotary_kernel(q, k, positions, cos_cache, sin_cache)
        cos, sin = self(positions, dtype)
        return lambda q, k: apply_rotary(q, k, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [T, H, D]; k: [T, Hkv, D]; cos, sin: [T, 1, D]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
