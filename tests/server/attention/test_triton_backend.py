"""The triton backend against the torch reference on one mixed step, and the whole engine on it
(under the Triton interpreter without a GPU: small shapes)."""

from __future__ import annotations

import pytest
import torch

from baton import SamplingParams
from baton.server.attention.metadata import build_attention_metadata
from baton.server.attention.torch_backend import TorchAttentionBackend
from baton.server.attention.triton_backend import TritonAttentionBackend
from baton.server.config import EngineConfig
from baton.server.engine import LLMEngine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
ATOL = {
    torch.float32: 2e-2 if DEVICE == "cuda" else 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_mixed_step_equals_the_torch_backend(dtype):
    """Two decodes and two prefills (one with a cached prefix) over scattered blocks."""
    g = torch.Generator().manual_seed(0)
    bs, h, hkv, d, nb, nl = 16, 4, 2, 64, 24, 2
    query_lens = [1, 1, 9, 12]
    seq_lens = [17, 40, 9, 33]  # the last prefill has 21 tokens cached before this step
    perm = torch.randperm(nb, generator=g).tolist()  # scattered, not increasing
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // bs)
        tables.append(perm[used : used + n])
        used += n
    meta_args = (query_lens, seq_lens, tables, bs, DEVICE)
    cache = torch.randn(nb, nl, 2, bs, hkv, d, generator=g).to(DEVICE, dtype)
    t = sum(query_lens)
    q = torch.randn(t, h, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(t, hkv, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(t, hkv, d, generator=g).to(DEVICE, dtype)
    caches, outs = [], []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        c = cache.clone()
        meta = build_attention_metadata(*meta_args)
        backend.prepare(meta)
        outs.append(backend.forward(q, k, v, c[:, 1], meta, d**-0.5))
        caches.append(c)
    assert not outs[1].isnan().any()
    torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=ATOL[dtype], rtol=1e-2)
    assert torch.equal(caches[1], caches[0])  # new K/V written at the same slots, nothing else


def run_engine(model: str, backend: str, device: str = DEVICE, dtype: str = "float32"):
    eng = LLMEngine(
        EngineConfig(
            model=model,
            load_format="dummy",
            seed=0,
            device=device,
            dtype=dtype,
            attention_backend=backend,
            max_num_batched_tokens=24,  # 40-token prompts prefill in chunks
            num_kv_blocks=64,
            show_progress=False,
            detokenize=False,
        )
    )
    shared = [7 + (3 * j) % 90 for j in range(20)]
    prompts = [shared, shared + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [5, 6, 7]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    tokens, cached = {}, {}
    eng.add_request("0", prompts[0], params)
    while eng.has_unfinished_requests():  # the first one alone, so the second hits its prefix
        for out in eng.step():
            tokens["0"] = out.outputs[0].token_ids
    for i in (1, 2):
        eng.add_request(str(i), prompts[i], params)
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens[out.request_id] = out.outputs[0].token_ids
            cached[out.request_id] = out.num_cached_tokens
    assert eng.runner.fused_ops == (backend == "triton")
    return [tokens[str(i)] for i in range(3)], cached


def test_engine_greedy_tokens_equal_the_torch_backend(tiny_config_dir):
    want, _ = run_engine(tiny_config_dir, "torch")
    got, cached = run_engine(tiny_config_dir, "triton")
    assert got == want
    assert cached["1"] == 16  # the shared prefix came from the cache


@pytest.mark.gpu
def test_engine_on_cuda_equals_transformers(tmp_path):
    """Greedy tokens of the triton engine (eager and with CUDA graphs) equal transformers'."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    hf = hf.to("cuda")
    prompt = [3 + (5 * j) % 400 for j in range(37)]
    with torch.no_grad():
        ids = hf.generate(
            torch.tensor([prompt], device="cuda"), max_new_tokens=12, do_sample=False
        )[0, len(prompt) :].tolist()
    for graphs in (False, True):
        eng = LLMEngine(
            EngineConfig(
                model=str(tmp_path),
                device="cuda",
                dtype="float32",
                cuda_graphs=graphs,
                num_kv_blocks=64,
                show_progress=False,
                detokenize=False,
            )
        )
        eng.add_request("r", prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        got = []
        while eng.has_unfinished_requests():
            for out in eng.step():
                got = out.outputs[0].token_ids
        assert got == ids, graphs
