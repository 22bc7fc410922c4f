"""Every kernel variant a model's forward pass launches, built by the launchers' own plan functions.

A variant is what makes Triton compile another binary: constexprs, warps, stages and argument
specializations. For a model shape, a dtype and a GPU, `model_launches` lists one launch per
variant the engine can reach while serving: each RMSNorm form, the rotary, SiLU and KV-store
kernels, decode attention with one split and with several, and the extend kernel for every
query-length bucket. The inputs are laid out as the model lays them out (q, k, v as views of
one qkv projection, gate and up of one gate_up) on the meta device: nothing is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.kernels.decode_attention import MAX_SPLITS, plan_decode
from baton.kernels.extend_attention import plan_extend
from baton.kernels.extend_config import query_buckets
from baton.kernels.launch import Arch, Launch
from baton.kernels.rmsnorm import plan_rms_norm
from baton.kernels.rotary import plan_rotary
from baton.kernels.silu_mul import plan_silu_and_mul
from baton.kernels.store_kv import plan_store_kv


@dataclass(frozen=True)
class Shape:
    """The dimensions of a decoder that select kernel variants."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf(cls, name: str, config: dict) -> Shape:
        heads = config["num_attention_heads"]
        return cls(
            name,
            config["hidden_size"],
            config["intermediate_size"],
            heads,
            config.get("num_key_value_heads", heads),
            config.get("head_dim") or config["hidden_size"] // heads,
        )


def model_launches(
    shape: Shape, dtype: torch.dtype, arch: Arch, block_size: int = 16
) -> list[Launch]:
    """One launch per distinct variant of every kernel a forward pass of `shape` runs."""
    dev = "meta"
    h, hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    t, blocks, width = 4, 8, 4

    def empty(*size, dtype=dtype):
        return torch.empty(*size, dtype=dtype, device=dev)

    qkv = empty(t, (h + 2 * hkv) * d)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + hkv) * d].view(t, hkv, d)
    v = qkv[:, (h + hkv) * d :].view(t, hkv, d)
    cache = empty(blocks, 2, block_size, hkv, d)  # one layer's view of the cache
    kc, vc = cache[:, 0], cache[:, 1]
    tables = empty(t, width, dtype=torch.int32)
    lens = empty(t, dtype=torch.int32)
    out = empty(t, h, d)
    x, w = empty(t, shape.hidden_size), empty(shape.hidden_size)
    gate_up = empty(t, 2 * shape.intermediate_size)
    gate, up = gate_up.chunk(2, dim=-1)
    cos = empty(64, d // 2, dtype=torch.float32)
    launches = [
        plan_rms_norm(x, None, w, 1e-6, empty(t, shape.hidden_size), None),
        plan_rms_norm(x, x, w, 1e-6, empty(t, shape.hidden_size), empty(t, shape.hidden_size)),
        plan_rotary(q, k, empty(t, h, d), empty(t, hkv, d), lens.long(), cos, cos),
        plan_silu_and_mul(gate, up, empty(t, shape.intermediate_size)),
        plan_store_kv(k, v, kc, vc, empty(t, dtype=torch.int64)),
    ]
    scale = d**-0.5
    launches += plan_decode(q, kc, vc, tables, lens, scale, out, out, out, arch)  # one split
    partial = empty(t, h, MAX_SPLITS, d, dtype=torch.float32)
    lse = empty(t, h, MAX_SPLITS, dtype=torch.float32)
    launches += plan_decode(q, kc, vc, tables, lens, scale, out, partial, lse, arch)
    qsl = empty(t + 1, dtype=torch.int32)
    for n in query_buckets(arch, dtype, d):
        launches.append(plan_extend(q, k, v, kc, vc, tables, qsl, lens, n, scale, out, arch))
    return launches
