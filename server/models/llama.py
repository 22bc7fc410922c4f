"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over the paged attention backend."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from baton.server.attention.base import ForwardContext
from baton.server.model_config import ModelConfig
from baton.server.models.cpu_linear import is_cpu_float32, return_freed_memory
from baton.server.models.layers import (
    FusedRows,
    Linear,
    RMSNorm,
    Rope,
    RotaryEmbedding,
    SiluAndMul,
)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        self.scale = d**-0.5
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * d, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * d, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * d, bias=bias)
        self.o_proj = Linear(self.num_heads * d, config.hidden_size, bias=False)
        self.qkv: FusedRows | None = None  # see LlamaForCausalLM.fuse_projections

    def forward(self, x: torch.Tensor, rope: Rope, ctx: ForwardContext) -> torch.Tensor:
        # x: [T, hidden]
        t = x.shape[0]
        if self.qkv is not None:
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = rope(q, k)
        cache = ctx.layer_cache(self.layer_idx)
        o = ctx.backend.forward(q, k, v, cache, ctx.meta, self.scale)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = SiluAndMul()
        self.gate_up: FusedRows | None = None  # see LlamaForCausalLM.fuse_projections

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act_fn(gate, up, fused))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: Rope,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fused = ctx.fused_ops
        if residual is None:
            x, residual = self.input_layernorm(x, fused=fused), x
        else:
            x, residual = self.input_layernorm(x, residual, fused)
        x = self.self_attn(x, rope, ctx)
        x, residual = self.post_attention_layernorm(x, residual, fused)
        return self.mlp(x, fused), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # NOTE: given its tensor, the embedding skips a random init the loader overwrites (which,
        # under a meta-device context, imported torch._dynamo: 2.7 s of a worker's start).
        self.embed_tokens = nn.Embedding(
            config.vocab_size,
            config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size),
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling_dict,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb.bind(positions, x.dtype, ctx.fused_ops)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, ctx)
        x, _ = self.norm(x, residual, ctx.fused_ops)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.cpu_plan: tuple[tuple[int, str], ...] | None = None  # see use_cpu_linear_plan
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share embed_tokens' tensor with lm_head when tied (again after `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """Run q/k/v and gate/up as one GEMM each (a step makes 4 matmuls per layer, not 7).
        Call once the parameters are on their device, in their dtype (see FusedRows)."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv = FusedRows(attn.q_proj, attn.k_proj, attn.v_proj)
            mlp.gate_up = FusedRows(mlp.gate_proj, mlp.up_proj)

    def cpu_linear_units(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of every matmul a step makes, in order: what a CPU linear plan is
        measured on. Call after fuse_projections."""
        units = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv is None or mlp.gate_up is None:
                raise ValueError("cpu linears: fuse_projections first")
            units += [(attn.qkv.weight, attn.qkv.bias), (attn.o_proj.weight, None)]
            units += [(mlp.gate_up.weight, None), (mlp.down_proj.weight, None)]
        return units + [(self.lm_head.weight, None)]

    @torch.no_grad()
    def use_cpu_linear_plan(self, ranges: tuple[tuple[int, str], ...], keeps_dense: bool) -> bool:
        """Multiply every float32 CPU linear through the plan's kernels (see cpu_linear_plan).
        Unless the plan keeps the dense weights (`keeps_dense`), they are freed (a tied head
        keeps the embedding's): from then on the model runs forward passes only, and
        `load_weights` refuses. False, with nothing changed, for weights that are not float32
        on the CPU."""
        if self.cpu_plan is not None or not is_cpu_float32(self.lm_head.weight):
            return False
        self.cpu_linear_units()  # fused first
        release = not keeps_dense
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv.use_plan(ranges, release)
            mlp.gate_up.use_plan(ranges, release)
            attn.o_proj.use_plan(ranges, release)
            mlp.down_proj.use_plan(ranges, release)
            if release:
                return_freed_memory()  # layer by layer, so the two copies never pile up
        self.lm_head.use_plan(ranges, release and not self.config.tie_word_embeddings)
        return_freed_memory()
        self.cpu_plan = ranges
        return True

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        # input_ids, positions: [T] (every sequence of the step, flattened) -> [T, hidden]
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> [N, vocab] float32
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into the parameters, casting to their dtype/device.

        Every parameter must be covered exactly once; a tied `lm_head.weight` may be absent.
        """
        if self.cpu_plan is not None:
            raise ValueError("weights: the linears are set up for CPU inference; load before")
        # NOTE: named_parameters() lists a tied lm_head only under model.embed_tokens.weight.
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in named_tensors:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            param = params.get(name)
            if param is None:
                unexpected.append(name)
                continue
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"weights: {name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(param.shape)}"
                )
            param.copy_(tensor)
            loaded.add(name)
        if unexpected:
            raise ValueError(f"weights: unexpected tensors {_few(unexpected)}")
        missing = [n for n in params if n not in loaded]
        if missing:
            raise ValueError(f"weights: missing tensors {_few(missing)}")


def _few(names: list[str], n: int = 5) -> str:
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
