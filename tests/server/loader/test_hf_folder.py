"""HF folders: sharded safetensors, dtype casting, the tokenizer when the folder ships one."""

from __future__ import annotations

import shutil

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


def save_tokenizer(d, eos: str, add_eos: bool, vocab_words=("<unk>", "hello", "world")):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab_words)}, unk_token="<unk>"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    if add_eos:
        fast.add_special_tokens({"eos_token": eos})
    else:
        fast.eos_token = eos
    fast.save_pretrained(d)
    return fast


@pytest.mark.parametrize(
    ("eos", "add_eos"), [("world", False), ("<|end|>", True), (None, False)], ids=str
)
def test_a_worker_finds_the_tokenizers_eos_without_loading_it(tmp_path, eos, add_eos):
    from baton.server.loader.hf_folder import tokenizer_eos_id

    fast = save_tokenizer(tmp_path, eos, add_eos)  # in the vocab, added, or none at all
    assert tokenizer_eos_id(tmp_path) == fast.eos_token_id


def test_a_worker_without_the_tokenizer_stops_on_the_same_eos(folder, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(folder[0], d)
    save_tokenizer(d, "<|end|>", add_eos=True)
    kw = dict(dtype=torch.float32, device="cpu", show_progress=False)
    full, light = load_model(str(d), **kw), load_model(str(d), tokenizer=False, **kw)
    assert light.tokenizer is None
    assert light.eos_token_id == full.eos_token_id == full.tokenizer.eos_token_id == 3


def test_the_default_models_eos_is_read_as_transformers_reads_it():
    from baton.server.loader.hf_folder import tokenizer_eos_id
    from baton.server.loader.resolve import resolve_model

    spec = resolve_model("smollm2")
    assert tokenizer_eos_id(spec.hf_dir) == spec.load_tokenizer().eos_token_id == 2
