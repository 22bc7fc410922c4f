"""Offline throughput: Baton's engine vs transformers `generate` with static batching.

Same prompts (seeded random token ids), same machine, same run. Output lengths are forced
(ignore_eos / min_new_tokens) so both produce exactly the same number of tokens.

    python benchmarks/offline_throughput.py                       # both scenarios, default model
    python benchmarks/offline_throughput.py --scenario fixed --num-prompts 16 --output-len 64
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import resource
import statistics
import time

import torch
from common import save_result


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_workload(
    scenario: str, num_prompts: int, input_len: int, output_len: int, vocab: int, seed: int
) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(100, vocab) for _ in range(rng.randint(input_len // 2, input_len))]
        for _ in range(num_prompts)
    ]
    if scenario == "fixed":
        lens = [output_len] * num_prompts
    else:
        lens = [rng.randint(8, output_len) for _ in range(num_prompts)]
    return prompts, lens


def run_baton(llm, prompts, lens) -> tuple[float, int]:
    from baton import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lens]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    produced = sum(len(o.token_ids) for o in outs)
    assert produced == sum(lens), (produced, sum(lens))
    return dt, produced


def hf_generate(model, prompts: list[list[int]], n: int, pad_id: int) -> None:
    """One static batch through transformers `generate`: left-padded, exactly `n` new tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad_id,
        )
    assert out.shape[1] == width + n


def run_hf(model, prompts, lens, batch_size: int, pad_id: int) -> tuple[float, int]:
    produced = 0
    t0 = time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        chunk, chunk_lens = prompts[b : b + batch_size], lens[b : b + batch_size]
        # static batching: the batch runs until its longest request is done
        hf_generate(model, chunk, max(chunk_lens), pad_id)
        produced += sum(chunk_lens)  # only the tokens each request asked for are useful
    return time.perf_counter() - t0, produced


def _worker(system: str, args: dict, workload: dict, conn) -> None:
    """Runs one system in its own process, so each peak RSS is its own."""
    torch.manual_seed(0)
    if system == "baton":
        from baton import LLM

        llm = LLM(
            model=args["model"], device=args["device"], dtype=args["dtype"], show_progress=False
        )
        run_baton(llm, workload["prompts"][:2], [4, 4])  # warm-up
        trials = [
            run_baton(llm, workload["prompts"], workload["lens"]) for _ in range(args["repeats"])
        ]
        extra = {"cpu_linear": llm.engine.runner.cpu_linear}  # the plan it chose here
    else:
        from transformers import AutoModelForCausalLM

        hf = (
            AutoModelForCausalLM.from_pretrained(
                workload["hf_dir"], dtype=getattr(torch, args["dtype"])
            )
            .to(args["device"])
            .eval()
        )
        pad = workload["pad"]
        run_hf(hf, workload["prompts"][:2], [4, 4], 2, pad)  # warm-up
        extra = {}
        trials = [
            run_hf(hf, workload["prompts"], workload["lens"], workload["hf_bs"], pad)
            for _ in range(args["repeats"])
        ]
    seconds = sorted(dt for dt, _ in trials)
    conn.send(
        {
            "seconds": statistics.median(seconds),  # the median trial: robust to a noisy host
            "trial_seconds": seconds,
            "tokens": trials[0][1],
            "peak_rss_mib": peak_rss_mib(),
            "threads": torch.get_num_threads(),
            **extra,
        }
    )
    conn.close()


def measure(system: str, args: dict, workload: dict) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(system, args, workload, child))
    proc.start()
    child.close()
    res = parent.recv()
    proc.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--scenario", choices=["fixed", "mixed", "both"], default="both")
    ap.add_argument(
        "--num-prompts", type=int, default=None, help="default: 16 for fixed, 64 for mixed"
    )
    ap.add_argument("--input-len", type=int, default=64, help="prompt lengths in [len/2, len]")
    ap.add_argument(
        "--output-len",
        type=int,
        default=None,
        help="fixed: exact output length (64); mixed: upper bound of 8..N (256)",
    )
    ap.add_argument(
        "--hf-batch-size",
        type=int,
        default=None,
        help="transformers static batch size (default: all prompts at once)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per system (median kept)")
    ap.add_argument("--save-result", default=None, help="JSON path (default: benchmarks/results)")
    args = ap.parse_args()

    from baton.server.loader import resolve_model

    # Both systems read the same HF folder (for a GGUF: its cached conversion).
    spec = resolve_model(args.model)
    scenarios = ["fixed", "mixed"] if args.scenario == "both" else [args.scenario]
    results = {}
    for sc in scenarios:
        n = args.num_prompts or (16 if sc == "fixed" else 64)
        out_len = args.output_len or (64 if sc == "fixed" else 256)
        prompts, lens = make_workload(sc, n, args.input_len, out_len, spec.vocab_size, args.seed)
        workload = {
            "prompts": prompts,
            "lens": lens,
            "hf_dir": spec.hf_dir,
            "pad": spec.pad_token_id,
            "hf_bs": args.hf_batch_size or n,
        }
        b = measure("baton", vars(args), workload)
        h = measure("transformers", vars(args), workload)
        row = {
            "num_prompts": n,
            "output_lens": lens,
            "input_lens": [len(p) for p in prompts],
            "hf_batch_size": workload["hf_bs"],
            "baton": {**b, "output_tok_s": b["tokens"] / b["seconds"]},
            "transformers": {**h, "output_tok_s": h["tokens"] / h["seconds"]},
        }
        row["speedup"] = row["baton"]["output_tok_s"] / row["transformers"]["output_tok_s"]
        results[sc] = row
        print(
            f"[{sc}] {n} prompts, {sum(lens)} output tokens: "
            f"baton {row['baton']['output_tok_s']:.1f} tok/s ({b['seconds']:.1f} s, peak RSS "
            f"{b['peak_rss_mib']:.0f} MiB); transformers {row['transformers']['output_tok_s']:.1f}"
            f" tok/s ({h['seconds']:.1f} s, peak RSS {h['peak_rss_mib']:.0f} MiB) "
            f"-> {row['speedup']:.2f}x"
        )
    path = save_result(
        f"offline_throughput_{args.device}", {"args": vars(args), **results}, args.save_result
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
