"""Build the model for a `model` string: resolved source, empty model, weights, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from baton.server.dtypes import DTYPE_NAMES
from baton.server.loader.dummy import init_dummy_weights
from baton.server.loader.hf_folder import iter_safetensors, tokenizer_eos_id
from baton.server.loader.resolve import resolve_model
from baton.server.model_config import ModelConfig
from baton.server.models.layers import RotaryEmbedding
from baton.server.models.llama import LlamaForCausalLM


@dataclass
class LoadedModel:
    model: LlamaForCausalLM  # eval mode, on the device, in the dtype
    config: ModelConfig
    tokenizer: Any | None  # a transformers tokenizer (None where not asked for, or none ships)
    eos_token_id: int | None  # the tokenizer's, else the config's first
    name: str  # the model's identity
    model_dir: Path | None  # the HF folder the weights came from; None for dummy weights


def load_model(
    model: str,
    *,
    load_format: str = "auto",
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    show_progress: bool = True,
    tokenizer: bool = True,
) -> LoadedModel:
    """`tokenizer=False` (a worker behind a router, which handles text) skips loading it."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype: must be one of {tuple(DTYPE_NAMES)}, got {dtype}")
    spec = resolve_model(model, load_format)
    net = empty_model(spec.config, dtype, torch.device(device))
    if load_format == "dummy":
        init_dummy_weights(net, seed)
    else:
        net.load_weights(iter_safetensors(spec.hf_dir, show_progress))
    tok = spec.load_tokenizer() if tokenizer else None
    eos = None if tok is None else tok.eos_token_id
    if eos is None and spec.hf_dir is not None:
        eos = tokenizer_eos_id(spec.hf_dir)
    if eos is None and not tokenizer and spec.has_tokenizer:  # files the JSON read cannot follow
        eos = spec.load_tokenizer().eos_token_id
    if eos is None and spec.config.eos_token_ids:
        eos = spec.config.eos_token_ids[0]
    return LoadedModel(
        model=net.eval(),
        config=spec.config,
        tokenizer=tok,
        eos_token_id=None if eos is None else int(eos),
        name=spec.name,
        model_dir=None if load_format == "dummy" else spec.hf_dir,
    )


def empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """The model with uninitialised parameters, allocated once, directly on the device."""
    with torch.device("meta"):
        net = LlamaForCausalLM(config).to(dtype)
    net.to_empty(device=device)
    net.tie_weights()  # to_empty gives each module its own tensor
    net.fuse_projections()  # views of the final tensors: loading fills the fused weights
    for m in net.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset_cache()
    return net
