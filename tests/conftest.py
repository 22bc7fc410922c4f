"""Shared fixtures: tiny dummy model folders and the default model, loaded once per session."""

from __future__ import annotations

import json
import os

import pytest
import torch

# NOTE: Triton picks the interpreter when a kernel is decorated, so this must happen before any
# test imports baton.kernels: without a GPU, kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need CUDA; without one they are reported as skipped, never run."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@pytest.fixture(scope="session")
def tiny_config_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(d)


@pytest.fixture(scope="session")
def smollm2():
    """The default model in float32 on CPU, shared by the tests that need real text."""
    from baton import LLM
    from baton.bench.cluster import CPU_LINEAR

    return LLM(
        model="smollm2",
        device="cpu",
        dtype="float32",
        kv_cache_gib=0.25,
        show_progress=False,
        cpu_linear=CPU_LINEAR,  # as the served workers of the tests run it
    )


@pytest.fixture(scope="session")
def disagg():
    """`baton serve` (1 prefill + 1 decode worker) for the tests that only send it requests."""
    from tests.server.router.test_serve_e2e import Server

    # every prompt handed off
    s = Server(
        "--mode", "disagg", "--max-local-prefill-tokens", "0", "--max-local-turn-tokens", "0"
    )
    yield s
    s.stop()


@pytest.fixture(scope="session")
def colocated():
    """`baton serve` with one colocated worker, beside `disagg` for the tests that compare."""
    from tests.server.router.test_serve_e2e import Server

    s = Server("--mode", "colocated")
    yield s
    s.stop()
