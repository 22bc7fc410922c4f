"""HF folders: sharded safetensors, dtype casting, the tokenizer when the folder ships one."""

from __future__ import annotations

import pytest
import torch
import transformers

from baton.server.loader import load_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny transformers Llama, sharded into several files, with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("hf-folder")
    hf.save_pretrained(d, max_shard_size="20KB")
    vocab = {w: i for i, w in enumerate(["<unk>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(d)
    return d, hf


def test_sharded_weights_and_tokenizer(folder):
    d, hf = folder
    assert len(list(d.glob("*.safetensors"))) > 1
    loaded = load_model(str(d), dtype=torch.float32, device="cpu", show_progress=False)
    assert loaded.model_dir == d and loaded.name == d.name
    assert loaded.tokenizer.encode("hello world") == [1, 2]
    ours = loaded.model.state_dict()
    for k, v in hf.state_dict().items():
        assert torch.equal(ours[k], v), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_are_cast_on_load(folder, dtype):
    d, hf = folder
    loaded = load_model(str(d), dtype=dtype, device="cpu", show_progress=False)
    assert all(p.dtype == dtype for p in loaded.model.parameters())
    assert loaded.model.model.rotary_emb.cos_cache.dtype == torch.float32
    w = hf.model.layers[1].self_attn.k_proj.weight
    assert torch.equal(loaded.model.model.layers[1].self_attn.k_proj.weight, w.to(dtype))
