"""GPU checks of the engine's numbers on a small random Llama: greedy tokens against transformers,
and CUDA-graph replays against eager steps (see benchmarks/gpu_check.py).

Random weights make near-ties between the two best tokens common, so where tokens differ the
check looks at the margin that flipped; each rule is stated below and in the JSON it returns.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from baton.scheduler.sampling_params import SamplingParams
from baton.server.config import EngineConfig
from baton.server.engine import LLMEngine

# The shape of tests/conftest.py's TINY_LLAMA, wider so heads are 128 like real models'.
TINY_LLAMA = {
    "vocab_size": 1024,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GREEDY_TOKENS = 24
FP32_ERROR = 1e-3  # TF32 dots in the attention kernels
MIN_BF16_ERROR = 0.02
GRAPH_ERROR = {"float32": 1e-3, "bfloat16": 0.05}

GREEDY_RULE = (
    "Every prompt's tokens equal transformers' greedy tokens in the same dtype, or first differ "
    "at a near-tie: where the fp32 model's logprobs of the two tokens are within twice the "
    "allowed error. Allowed error: fp32 1e-3 (our Triton attention multiplies fp32 as TF32); "
    "bf16 twice transformers' own bf16 error (its logprobs against fp32), at least 0.02. Our "
    "logprobs must also stay within the allowed error of the fp32 model's at every step."
)
GRAPHS_RULE = (
    "The engine with CUDA graphs on and off gives the same tokens, or they first differ where "
    "eager's two best logprobs are within twice the largest logprob difference the runs showed "
    "before; that difference stays under 1e-3 (fp32) or 0.05 (bf16), and graphs were replayed."
)


def tiny_llama(folder: Path) -> Path:
    """Seeded random fp32 weights in an HF folder both sides load."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(folder)
    return folder


def prompts(n: int, lengths: list[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return [
        torch.randint(3, TINY_LLAMA["vocab_size"], (k,), generator=gen).tolist() for k in lengths
    ]


def engine_outputs(folder: Path, dtype: str, reqs: list[tuple[list[int], int]], graphs: bool):
    """(completions in request order, decode steps replayed from graphs) of one engine run."""
    eng = LLMEngine(
        EngineConfig(
            model=str(folder),
            device="cuda",
            dtype=dtype,
            seed=0,
            cuda_graphs=graphs,
            max_num_seqs=16,
            num_kv_blocks=512,
            show_progress=False,
            detokenize=False,
        )
    )
    if (eng.runner.graphs is not None) != graphs:
        raise RuntimeError(f"cuda_graphs={graphs} but the runner has graphs={eng.runner.graphs}")
    replays: list = [None]  # None: not counted
    if graphs and hasattr(eng.runner.graphs, "run"):  # so a check that never replayed fails
        replays[0], run = 0, eng.runner.graphs.run

        def counted(*a, **kw):
            replays[0] += 1
            return run(*a, **kw)

        eng.runner.graphs.run = counted
    for i, (prompt, n) in enumerate(reqs):
        p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=2)
        eng.add_request(str(i), prompt, p)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    del eng
    torch.cuda.empty_cache()
    return [done[str(i)] for i in range(len(reqs))], replays[0]


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, one full forward per token (no cache to differ in)."""
    ids = torch.tensor([prompt], device="cuda")
    for _ in range(n):
        nxt = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


@torch.inference_mode()
def teacher_forced(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """fp32 log-softmax over the vocabulary before each of `tokens`: [len(tokens), vocab]."""
    ids = torch.tensor([prompt + tokens], device="cuda")
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def greedy_vs_transformers(work: Path) -> dict:
    folder = tiny_llama(work / "tiny-llama")
    lengths = [7, 23, 64, 150]
    ps = prompts(1, lengths)
    ref = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to("cuda").eval()
    out: dict = {"rule": GREEDY_RULE}
    passed = True
    for name, dtype in DTYPES.items():
        hf = (
            ref
            if dtype == torch.float32
            else LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to("cuda").eval()
        )
        hf_toks = [hf_greedy(hf, p, GREEDY_TOKENS) for p in ps]
        if dtype == torch.float32:
            allowed = FP32_ERROR
            hf_err = None
        else:  # transformers' own bf16 error, logprobs of its tokens against the fp32 model
            hf_err = 0.0
            for p, toks in zip(ps, hf_toks, strict=True):
                lp32 = teacher_forced(ref, p, toks)
                lp = teacher_forced(hf, p, toks)
                hf_err = max(hf_err, float((lp - lp32).abs().max()))
            allowed = max(MIN_BF16_ERROR, 2 * hf_err)
        ours, _ = engine_outputs(folder, name, [(p, GREEDY_TOKENS) for p in ps], graphs=True)
        rows, our_err = [], 0.0
        for p, want, got in zip(ps, hf_toks, ours, strict=True):
            lp32 = teacher_forced(ref, p, got.token_ids)
            mine = torch.tensor([lp for _, lp, _ in got.logprobs], device="cuda")
            chosen = lp32.gather(1, torch.tensor(got.token_ids, device="cuda")[:, None])[:, 0]
            our_err = max(our_err, float((mine - chosen).abs().max()))
            row = {"prompt_len": len(p), "identical": got.token_ids == want}
            d = first_divergence(got.token_ids, want)
            if d is not None:
                gap = float(lp32[d, want[d]] - lp32[d, got.token_ids[d]])
                row.update(
                    first_divergence=d,
                    transformers_token=want[d],
                    our_token=got.token_ids[d],
                    fp32_gap=gap,
                    near_tie=abs(gap) <= 2 * allowed,
                )
            rows.append(row)
        ok = our_err <= allowed and all(r["identical"] or r["near_tie"] for r in rows)
        out[name] = {
            "passed": ok,
            "allowed_error": allowed,
            "our_error": our_err,
            "transformers_bf16_error": hf_err,
            "prompts": rows,
        }
        passed &= ok
        if hf is not ref:
            del hf
        torch.cuda.empty_cache()
    out["passed"] = passed
    return out


def graphs_vs_eager(work: Path) -> dict:
    folder = tiny_llama(work / "tiny-llama")
    # 12 requests finishing one after another: the batch shrinks through the buckets 16..1.
    lengths = [5 + 9 * i for i in range(12)]
    reqs = list(zip(prompts(2, lengths), [8 + 3 * i for i in range(12)], strict=True))
    out: dict = {"rule": GRAPHS_RULE}
    passed = True
    for name in DTYPES:
        eager, _ = engine_outputs(folder, name, reqs, graphs=False)
        graph, replays = engine_outputs(folder, name, reqs, graphs=True)
        rows, diff = [], 0.0
        for e, g in zip(eager, graph, strict=True):
            d = first_divergence(e.token_ids, g.token_ids)
            same = len(e.token_ids) if d is None else d
            for i in range(same):
                diff = max(diff, abs(e.logprobs[i][1] - g.logprobs[i][1]))
            row = {"tokens": len(e.token_ids), "identical": e.token_ids == g.token_ids}
            if d is not None:
                top = e.logprobs[d][2]
                row.update(first_divergence=d, eager_top2_gap=top[0][1] - top[1][1])
            rows.append(row)
        for r in rows:
            if not r["identical"]:
                r["near_tie"] = r["eager_top2_gap"] <= 2 * diff
        ok = (
            replays != 0
            and diff <= GRAPH_ERROR[name]
            and all(r["identical"] or r["near_tie"] for r in rows)
        )
        out[name] = {
            "passed": ok,
            "graph_replays": replays,
            "max_logprob_diff": diff,
            "allowed_diff": GRAPH_ERROR[name],
            "requests": rows,
        }
        passed &= ok
    out["passed"] = passed
    return out
