"""Shared fixtures: tiny dummy model folders and the default model, loaded once per session."""

from __future__ import annotations

import json
import os
import sys

import pytest

from baton.server.cpu_threads import ThreadConfig, apply_thread_plan, plan_threads


def _wait_as_a_worker_does() -> None:
    """The suite's own process runs engines (and transformers) in-process: its threads wait
    between parallel regions as a worker's do (`brief`, chosen before torch loads OpenMP), then
    the environment is put back, so the servers the tests start choose their own plans.

    NOTE: with OpenMP's default spinning, the in-process engine tests ran 2.5-3x slower beside
    one busy process on a 2-core host; see baton.server.cpu_threads for why."""
    if "torch" in sys.modules:  # too late to take; say nothing and change nothing
        return
    plan = plan_threads(ThreadConfig())
    saved = {key: os.environ.get(key) for key, _ in plan.env}
    apply_thread_plan(plan)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_wait_as_a_worker_does()

import torch  # noqa: E402

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


def offline_llm(model: str, kv_cache_gib: float):
    """`model` in float32 on CPU, its linears planned as the served workers of the tests run."""
    from baton import LLM
    from baton.bench.cluster import CPU_LINEAR

    return LLM(
        model=model,
        device="cpu",
        dtype="float32",
        kv_cache_gib=kv_cache_gib,
        show_progress=False,
        cpu_linear=CPU_LINEAR,
    )


@pytest.fixture(scope="session")
def smollm2():
    """The default model, shared by the tests that need real text."""
    return offline_llm("smollm2", 0.25)


# The default model cut to its first and last layers (of 30): its real embeddings, tokenizer and
# chat template, 5-6x less work a token, and greedy text still varied (a wrong position or a
# lost token would show). For the tests that prove what processes do with requests, not what
# the model says.
CUT_LAYERS = (0, 29)
# NOTE: its KV per token is this fraction of the default model's; a test that sizes a KV cache
# for a number of blocks scales its --kv-cache-gib by it.
CUT_KV_SCALE = len(CUT_LAYERS) / 30


def write_cut_model(src, dst) -> str:
    """An HF folder at `dst`: the default model's folder `src` keeping only CUT_LAYERS."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    assert config["num_hidden_layers"] == 30, config
    config["num_hidden_layers"] = len(CUT_LAYERS)
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if (
            f.is_file()
            and not f.name.startswith(".")
            and f.name not in ("config.json", "model.safetensors")
        ):
            shutil.copy(f, dst / f.name)
    weights = load_file(src / "model.safetensors")
    cut = {k: v for k, v in weights.items() if not k.startswith("model.layers.")}
    for i, layer in enumerate(CUT_LAYERS):
        old = f"model.layers.{layer}."
        cut.update(
            {
                f"model.layers.{i}." + k[len(old) :]: v
                for k, v in weights.items()
                if k.startswith(old)
            }
        )
    save_file(cut, dst / "model.safetensors")
    return str(dst)


@pytest.fixture(scope="session")
def cut_model(tmp_path_factory):
    """The folder of the cut default model (see CUT_LAYERS)."""
    from baton.server.loader.resolve import resolve_model

    return write_cut_model(
        resolve_model("smollm2").hf_dir, tmp_path_factory.mktemp("cut") / "smollm2-cut"
    )


@pytest.fixture(scope="session")
def cut_llm(cut_model):
    """The cut model offline."""
    return offline_llm(cut_model, 0.05)


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
