"""Dummy weights: seeded, deterministic, HF-like statistics, no checkpoint or tokenizer needed."""

from __future__ import annotations

import torch

from baton.server.loader import load_model


def dummy(model, seed, dtype=torch.float32):
    return load_model(
        model, load_format="dummy", dtype=dtype, device="cpu", seed=seed, show_progress=False
    )


def test_same_seed_same_weights_other_seed_differs(tiny_config_dir):
    a, b, c = (dummy(tiny_config_dir, s).model.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_statistics_and_result(tiny_config_dir):
    loaded = dummy(tiny_config_dir, 3)
    assert loaded.tokenizer is None and loaded.model_dir is None
    assert loaded.config.vocab_size == 256 and not loaded.model.training
    w = loaded.model.state_dict()
    assert torch.equal(w["model.norm.weight"], torch.ones(64))
    assert abs(w["model.layers.0.mlp.up_proj.weight"].std().item() - 0.02) < 0.002


def test_json_config_and_dtype(tiny_config_dir):
    loaded = dummy(f"{tiny_config_dir}/config.json", 0, torch.bfloat16)
    assert loaded.name == "config"
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    ref = dummy(tiny_config_dir, 0).model.state_dict()
    got = loaded.model.state_dict()
    assert torch.equal(got["lm_head.weight"], ref["lm_head.weight"].bfloat16())
