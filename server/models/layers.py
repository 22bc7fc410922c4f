"""Layers shared by the model family: Linear, RMSNorm, rotary embedding, gated SiLU."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Rope = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _onednn_linear() -> Callable[..., torch.Tensor] | None:
    """oneDNN's inner product, when this torch build has it and it agrees with F.linear."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if hasattr(torch, "ops") else None
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=gen) for s in ((3, 8), (5, 8), (5,)))
        with torch.no_grad():
            ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
    except RuntimeError:
        return None
    return op if ok else None


_ONEDNN_LINEAR = _onednn_linear()


class Linear(nn.Linear):
    """nn.Linear whose float32 CPU matmuls go through oneDNN rather than BLAS.

    NOTE: torch's CPU wheel sends float32 F.linear to MKL, which on some AMD hosts packs the
    whole weight on every call at small batch: there oneDNN ran a decode step's linears 1.4-2.5x
    faster (batch 2..64, 2-core EPYC). On another 2-core EPYC, MKL was 27% faster at batch 1
    and 1.6x at 2, even from 4 on. So the row count from which oneDNN takes over is measured on
    the host at load (`pick_onednn_from`). Same math, different summation order (float32
    rounding only).
    """

    onednn_from = 1  # rows from which float32 CPU calls take oneDNN (set per model at load)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.onednn_from)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn_from: int = 1
) -> torch.Tensor:
    if (
        _ONEDNN_LINEAR is not None
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.shape[0] >= onednn_from
    ):
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


MKL_MARGIN = 0.85  # MKL keeps a row count only when it takes under 85% of oneDNN's time


def pick_onednn_from(
    weights: list[torch.Tensor], rows: tuple[int, ...] = (1, 2, 4, 8), reps: int = 3
) -> int:
    """The smallest row count in `rows` from which oneDNN is used on `weights` (float32 CPU
    matrices, timed here, median of `reps`): the first at which F.linear is not clearly faster.

    NOTE: the margin keeps the choice stable from one process to the next (a prefill and a
    decode worker should round alike); where the two are close, oneDNN is kept.
    """
    if _ONEDNN_LINEAR is None:
        return 1 << 30
    gen = torch.Generator().manual_seed(0)  # not the global stream: loading draws nothing
    for m in rows:
        xs = {w.shape[1]: torch.randn(m, w.shape[1], generator=gen) for w in weights}
        times = {}
        for name, fn in (
            ("mkl", lambda x, w: F.linear(x, w)),
            ("onednn", lambda x, w: _ONEDNN_LINEAR(x, w, None, "none", [], "")),
        ):
            trials = []
            for _ in range(reps + 1):  # the first call of a shape builds oneDNN's primitive
                t0 = time.perf_counter()
                for w in weights:
                    fn(xs[w.shape[1]], w)
                trials.append(time.perf_counter() - t0)
            times[name] = sorted(trials[1:])[reps // 2]
        if times["mkl"] >= MKL_MARGIN * times["onednn"]:
            return m
    return rows[-1] * 2


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
        self.onednn_from = 1  # see Linear

    @staticmethod
    def _stack(params: list[nn.Parameter]) -> torch.Tensor:
        stacked = torch.cat([p.detach() for p in params])
        start = 0
        for p in params:
            p.data = stacked[start : start + p.shape[0]]
            start += p.shape[0]
        return stacked

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return linear(x, self.weight, self.bias, self.onednn_from).split(self.sizes, dim=-1)


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
