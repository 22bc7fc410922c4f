"""ModelConfig parsing of configs written by transformers 4.x and 5.x."""

from __future__ import annotations

import dataclasses

import pytest

from baton.server.model_config import ModelConfig

BASE = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 1000,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
LLAMA3 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def parse(**overrides):
    return ModelConfig.from_hf_dict({**BASE, **overrides})


def test_defaults_and_derived_fields():
    c = parse()
    assert c.head_dim == 32 and c.rope_theta == 10000.0 and c.rope_scaling is None
    assert c.rope_type == "default" and c.rope_scaling_dict is None
    assert c.eos_token_ids == (2,) and c.bos_token_id == 1
    assert not c.tie_word_embeddings and not c.attention_bias
    assert c.architectures == ("LlamaForCausalLM",)
    assert parse(num_key_value_heads=None).num_key_value_heads == 8
    assert parse(head_dim=64).head_dim == 64
    assert parse(eos_token_id=[5, 6]).eos_token_ids == (5, 6)
    assert parse(eos_token_id=None).eos_token_ids == ()


def test_frozen_and_hashable():
    c = parse(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **LLAMA3})
    assert hash(c) == hash(dataclasses.replace(c))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.vocab_size = 3


def test_transformers_4_and_5_rope_layouts_agree():
    v4 = parse(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **LLAMA3})
    v4_old_key = parse(rope_theta=500000.0, rope_scaling={"type": "llama3", **LLAMA3})
    v5 = parse(rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3", **LLAMA3})
    assert v4 == v4_old_key == v5
    assert v5.rope_theta == 500000.0 and v5.rope_scaling_dict == {"rope_type": "llama3", **LLAMA3}
    plain = parse(rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None
    assert parse(rope_scaling={"type": "linear", "factor": 2.0}).rope_scaling_dict == {
        "rope_type": "linear",
        "factor": 2.0,
    }


def test_unsupported_rope_and_model_type_are_named():
    with pytest.raises(ValueError, match="'yarn'"):
        parse(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="'gpt2'.*llama, mistral, qwen2"):
        parse(model_type="gpt2")
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        parse(hidden_size=None)


def test_qwen2_has_qkv_bias_and_ignores_an_unused_window():
    c = parse(model_type="qwen2", sliding_window=4096, use_sliding_window=False)
    assert c.attention_bias
    with pytest.raises(ValueError, match="sliding_window"):
        parse(model_type="qwen2", sliding_window=1024, use_sliding_window=True)


def test_mistral_sliding_window():
    assert parse(model_type="mistral", sliding_window=None).model_type == "mistral"
    assert parse(model_type="mistral", sliding_window=4096).model_type == "mistral"
    with pytest.raises(ValueError, match="sliding_window=1024.*not supported"):
        parse(model_type="mistral", sliding_window=1024)
