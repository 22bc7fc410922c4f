"""One decode step of a full-size model with dummy weights (benchmarks/kernels.py `step`), against
its memory floor: the bytes a step must read, weights and KV, at the measured copy bandwidth.

One engine serves every batch size (its requests aborted in between), with a KV cache sized for
the largest batch. Two times per batch size, each against its own floor:
- gpu: the decode CUDA graph of the batch's bucket replayed alone, timed with CUDA events. It
  runs the layers and the final norm, not lm_head: its floor leaves lm_head out.
- step: `engine.step()` by the wall clock: host scheduling, graph replay, lm_head, sampling.
Neither floor counts the embedding table: a step gathers one row of it per sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

TOKEN_BUDGET = 16384  # max_num_batched_tokens: prompts prefill in a few large chunks
WARMUP_STEPS = 3
TRACE_STEPS = 2  # a trace of a missed target runs one step untraced, one traced


@dataclass(frozen=True)
class StepPlan:
    """Sizes of the one engine: every request fits its context, every batch fits the cache."""

    max_tokens: int
    max_model_len: int
    num_kv_blocks: int


def plan_step(max_batch: int, context: int, iters: int, block_size: int) -> StepPlan:
    prefill_steps = -(-max_batch * context // TOKEN_BUDGET)  # early prompts decode meanwhile
    max_tokens = prefill_steps + WARMUP_STEPS + iters + TRACE_STEPS + 4
    max_model_len = context + max_tokens
    blocks = max_batch * -(-max_model_len // block_size)
    return StepPlan(max_tokens, max_model_len, blocks + max_batch)


def weight_read_bytes(
    params: dict[str, tuple[int, int]], embed: str, lm_head: str, with_lm_head: bool
) -> int:
    """Bytes of weights one decode step reads. `params`: name -> (tensor identity, bytes), tied
    names sharing an identity. The embedding table is left out; lm_head counts when
    `with_lm_head`, once, even when it is the embedding's tensor."""
    unique = {key: n for key, n in params.values()}
    total = sum(unique.values()) - params[embed][1]
    tied = params[embed][0] == params[lm_head][0]
    if with_lm_head and tied:
        total += params[lm_head][1]
    elif not with_lm_head and not tied:
        total -= params[lm_head][1]
    return total


def model_params(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (id(p), p.numel() * p.element_size())
        for name, p in model.named_parameters(remove_duplicate=False)
    }


def floor_ms(nbytes: float, copy_gbps: float) -> float:
    return nbytes / (copy_gbps * 1e9) * 1e3


def _all_decoding(eng) -> bool:
    b = eng.batcher
    return not b.num_waiting and not any(s.is_prefill for s in b.running)


def _replay_ms(eng, batch: int, iters: int) -> tuple[float, int, int]:
    """(ms per replay of the batch's graph, its bucket, KV tokens one replay reads)."""
    from baton.server.cuda_graph import bucket_for

    graphs = eng.runner.graphs
    bucket = bucket_for(batch, graphs.sizes)
    graph = graphs.graphs[bucket][0]
    kv_tokens = int(graphs.seq_lens[:bucket].sum())  # the last step's inputs, padded rows too
    for _ in range(WARMUP_STEPS):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters, bucket, kv_tokens


def step(args, ceil: dict, out_dir: Path, target) -> list[dict]:
    from baton import SamplingParams
    from baton.server.config import EngineConfig
    from baton.server.engine import LLMEngine

    batches = sorted(set(args.step_batches))
    ctx, iters, block = args.step_context, args.step_iters, 16
    plan = plan_step(batches[-1], ctx, iters, block)
    t0 = time.perf_counter()
    eng = LLMEngine(
        EngineConfig(
            model=args.step_model,
            load_format="dummy",
            dtype="bfloat16",
            device="cuda",
            block_size=block,
            max_num_seqs=batches[-1],
            max_num_batched_tokens=TOKEN_BUDGET,
            max_model_len=plan.max_model_len,
            num_kv_blocks=plan.num_kv_blocks,
            show_progress=False,
            detokenize=False,
        )
    )
    print(f"step: {args.step_model} engine ready in {time.perf_counter() - t0:.0f} s, {plan}")
    model = eng.runner.model
    params = model_params(model)
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    w_step = weight_read_bytes(params, embed, head, with_lm_head=True)
    w_gpu = weight_read_bytes(params, embed, head, with_lm_head=False)
    kv = eng.runner.kv_cache  # [blocks, layers, 2, block, kv heads, head dim]
    kv_per_token = kv[0].numel() * kv.element_size() // block
    sp = SamplingParams(max_tokens=plan.max_tokens, temperature=0, ignore_eos=True)
    gen, vocab = torch.Generator().manual_seed(0), eng.model_config.vocab_size
    rows = []
    for b in batches:
        eng.abort_all()
        for i in range(b):
            prompt = torch.randint(3, vocab, (ctx,), generator=gen).tolist()
            eng.add_request(f"b{b}-{i}", prompt, sp)
        t0 = time.perf_counter()
        while not _all_decoding(eng):
            eng.step()
        prefill_s = time.perf_counter() - t0
        for _ in range(WARMUP_STEPS):
            eng.step()
        running = list(eng.batcher.running)
        # Each step reads every sequence's KV, the token it adds included; lengths grow by one.
        kv_tokens = sum(s.num_tokens for s in running) + b * (iters - 1) / 2
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            eng.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / iters * 1e3
        if len(eng.batcher.running) != b:
            raise RuntimeError(f"batch {b}: {len(eng.batcher.running)} sequences left running")
        row = {
            "batch": b,
            "context": ctx,
            "prefill_s": prefill_s,
            "step_ms": step_ms,
            "step_floor_ms": floor_ms(w_step + kv_tokens * kv_per_token, ceil["copy_gbps"]),
            "tokens_per_s": b / step_ms * 1e3,
        }
        row["step_vs_floor"] = row["step_ms"] / row["step_floor_ms"]
        try:
            gpu_ms, bucket, replay_tokens = _replay_ms(eng, b, iters)
            gpu_floor = floor_ms(w_gpu + replay_tokens * kv_per_token, ceil["copy_gbps"])
            row.update(bucket=bucket, gpu_ms=gpu_ms, gpu_floor_ms=gpu_floor)
            row["gpu_vs_floor"] = gpu_ms / gpu_floor
        except Exception as e:  # no graphs (or none for this batch): the step time still stands
            row["gpu_error"] = f"{type(e).__name__}: {e}"[:300]
        print(
            f"step b={b:>3}: {step_ms:.2f} ms ({row['step_vs_floor']:.2f}x its floor), "
            + (
                f"graph alone {row['gpu_ms']:.2f} ms ({row['gpu_vs_floor']:.2f}x)"
                if "gpu_ms" in row
                else "no graph time"
            )
        )
        if b == target.case["batch"]:
            got = {k: row[k] for k in ("context", "step_ms", "step_floor_ms", "step_vs_floor")}
            target.record(
                row["step_vs_floor"] <= 1.25, got, eng.step, out_dir / f"trace_step_b{b}.json"
            )
        rows.append(row)
    eng.abort_all()
    return rows
