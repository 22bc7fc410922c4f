"""Model strings: what is accepted, what is refused (with the name), the shipped configs."""

from __future__ import annotations

import json

import pytest
import torch

from baton.server.loader import empty_model, load_model, resolve_model
from baton.server.loader.resolve import locate, shipped_configs


def load(model, **kw):
    return load_model(model, dtype=torch.float32, device="cpu", show_progress=False, **kw)


def test_unknown_name_is_refused_with_the_accepted_forms():
    with pytest.raises(ValueError, match="'no-such-model'.*smollm2.*llama-3-8b"):
        load("no-such-model")
    with pytest.raises(ValueError, match="'no-such-model'"):
        load("no-such-model", load_format="dummy")


def test_missing_path_and_folder_without_config(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope.*no such path"):
        load(missing)
    with pytest.raises(ValueError, match="without config.json"):
        load(str(tmp_path))


def test_unsupported_model_type_names_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8}))
    with pytest.raises(ValueError, match="'gpt2'.*supported: llama, mistral, qwen2") as e:
        load(str(tmp_path), load_format="dummy")
    assert str(tmp_path) in str(e.value)


def test_config_without_weights_needs_dummy(tiny_config_dir):
    with pytest.raises(ValueError, match="no \\*.safetensors.*dummy"):
        load(tiny_config_dir)
    config_file = f"{tiny_config_dir}/config.json"
    with pytest.raises(ValueError, match="config.json"):
        load(config_file)
    assert locate(config_file, "dummy").kind == "config_file"


def test_bad_load_format_and_dtype(tiny_config_dir):
    with pytest.raises(ValueError, match="load_format"):
        load(tiny_config_dir, load_format="pt")
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_config_dir, load_format="dummy", dtype=torch.int8, device="cpu")


def test_shipped_configs_parse_and_build_on_meta():
    assert {"llama-3-8b", "qwen2.5-7b"} <= set(shipped_configs())
    llama = resolve_model("llama-3-8b", load_format="dummy")
    c = llama.config
    assert llama.name == "llama-3-8b" and llama.hf_dir is None
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (4096, 14336, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 8, 128)
    assert c.vocab_size == 128256 and c.rope_theta == 500000.0 and c.rope_type == "llama3"
    assert c.rope_scaling_dict["original_max_position_embeddings"] == 8192
    assert c.eos_token_ids == (128001, 128008, 128009) and c.bos_token_id == 128000
    assert not c.tie_word_embeddings and c.max_position_embeddings == 131072
    model = empty_model(c, torch.bfloat16, torch.device("meta"))
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248

    qwen = resolve_model("qwen2.5-7b", load_format="dummy").config
    assert (qwen.hidden_size, qwen.num_hidden_layers, qwen.num_key_value_heads) == (3584, 28, 4)
    assert qwen.attention_bias and qwen.vocab_size == 152064 and qwen.rope_theta == 1e6
    model = empty_model(qwen, torch.bfloat16, torch.device("meta"))
    assert sum(p.numel() for p in model.parameters()) == 7_615_616_512
