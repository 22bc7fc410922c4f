"""Start-up compilation: each variant a serving step reaches is compiled before any request."""

from __future__ import annotations

import pytest
import torch

from baton import SamplingParams
from baton.server.config import EngineConfig
from baton.server.engine import LLMEngine
from baton.server.warmup import compile_kernels, compiled_binaries

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def engine(model: str, **kw) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=model,
            load_format="dummy",
            seed=0,
            device=DEVICE,
            dtype="float32",
            attention_backend="triton",
            num_kv_blocks=64,
            show_progress=False,
            detokenize=False,
            **kw,
        )
    )


# The poisoned cache makes the discarded warm-up outputs NaN, as garbage in a fresh cache would.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_warm_up_steps_run_every_path_and_write_no_kv(tiny_config_dir):
    eng = engine(tiny_config_dir, max_num_batched_tokens=48)
    runner = eng.runner
    runner.kv_cache.fill_(float("nan"))
    calls = []
    forward = runner.backend.forward

    def spy(q, k, v, cache, meta, scale):
        calls.append((meta.num_decodes, meta.num_seqs, meta.extras.get("num_splits")))
        return forward(q, k, v, cache, meta, scale)

    runner.backend.forward = spy
    compile_kernels(runner.model, runner.backend, runner.kv_cache, 16, 48, 512, True)
    steps = sorted(set(calls), key=str)
    # Decodes alone with one split and with two, and a prefill behind a decode.
    assert (1, 1, 1) in steps and (2, 2, 2) in steps and (1, 2, None) in steps
    assert torch.isnan(runner.kv_cache).all()  # slot -1: nothing written


@pytest.mark.gpu
def test_serving_compiles_nothing_after_start(tiny_config_dir):
    eng = engine(tiny_config_dir, max_num_seqs=16, max_num_batched_tokens=256)
    start = compiled_binaries()
    assert start > 0
    gen = torch.Generator().manual_seed(0)
    # Batches of 1..12, prompts of 1..300 tokens (chunked), decodes to ~60 tokens of context.
    for wave, (n, longest) in enumerate([(1, 5), (3, 40), (12, 300), (7, 130), (2, 17)]):
        for i in range(n):
            length = int(torch.randint(1, longest + 1, (1,), generator=gen))
            prompt = torch.randint(3, 200, (length,), generator=gen).tolist()
            params = SamplingParams(max_tokens=5 + 7 * i, temperature=0, ignore_eos=True)
            eng.add_request(f"{wave}-{i}", prompt, params)
        while eng.has_unfinished_requests():
            eng.step()
    assert compiled_binaries() == start
