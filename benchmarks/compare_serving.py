"""Baton disaggregated (1 prefill + 1 decode) vs Baton colocated vs transformers `generate` with
static batching, on the same random token prompts, at each concurrency.

Baton runs as `baton serve` and is loaded by the `baton bench` client (streaming, client-side
timing). transformers runs in this process: at concurrency c it takes the prompts c at a time and
generates each batch to its end (static batching), so a request's latency is its batch's.

    python benchmarks/compare_serving.py                           # CPU, smollm2, c = 1..32
    python benchmarks/compare_serving.py --concurrency 1 8 --input-len 64 --output-len 32
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch
from common import save_result, served
from offline_throughput import hf_generate

from baton.bench import datasets
from baton.bench.metrics import compute_metrics
from baton.bench.plots import pyplot
from baton.bench.runner import LoadConfig, run_load


def baton_rows(args, mode: str) -> list[dict]:
    rows = []
    with served(args, mode) as url:
        for c in args.concurrency:
            n = max(args.min_prompts, args.prompts_per_slot * c)
            reqs = datasets.random_requests(
                n + 1, args.input_len, args.output_len, 0.0, chat=False, seed=c
            )
            cfg = LoadConfig(base_url=url, max_concurrency=c, num_warmups=1, progress=False)
            results, duration = asyncio.run(run_load(reqs, cfg))
            m = compute_metrics(results[1:], duration)
            if m["failed"]:
                raise RuntimeError(f"{mode} c={c}: {m['error_counts']}")
            rows.append(summary_row(mode, c, m))
            print_row(rows[-1])
    return rows


def hf_rows(args) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from baton.server.loader import resolve_model

    spec = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(spec.hf_dir, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    pad = spec.pad_token_id
    rows = []
    for c in args.concurrency:
        n = max(args.min_prompts, args.prompts_per_slot * c)
        reqs = datasets.random_requests(n + 1, args.input_len, args.output_len, 0.0, False, c)
        hf_generate(model, [reqs[0].prompt], args.output_len, pad)  # warm-up
        reqs = reqs[1:]
        latencies = []
        start = time.perf_counter()
        for b in range(0, n, c):
            t0 = time.perf_counter()
            hf_generate(model, [r.prompt for r in reqs[b : b + c]], args.output_len, pad)
            latencies += [time.perf_counter() - t0] * len(reqs[b : b + c])
        duration = time.perf_counter() - start
        m = {
            "completed": n,
            "request_throughput": n / duration,
            "output_throughput": n * args.output_len / duration,
            "mean_e2el_ms": 1e3 * sum(latencies) / n,
            "median_ttft_ms": None,  # generate() does not stream
            "median_tpot_ms": None,
        }
        rows.append(summary_row("transformers", c, m))
        print_row(rows[-1])
    return rows


def summary_row(system: str, c: int, m: dict) -> dict:
    keys = ("completed", "request_throughput", "output_throughput", "mean_e2el_ms")
    keys += ("median_ttft_ms", "median_tpot_ms")
    return {"system": system, "concurrency": c, **{k: m.get(k) for k in keys}}


def print_row(r: dict) -> None:
    ttft = "-" if r["median_ttft_ms"] is None else f"{r['median_ttft_ms']:.0f}"
    tpot = "-" if r["median_tpot_ms"] is None else f"{r['median_tpot_ms']:.0f}"
    print(
        f"{r['system']:>12} c={r['concurrency']:>3}: {r['output_throughput']:7.1f} tok/s, "
        f"TTFT {ttft} ms, TPOT {tpot} ms, E2E {r['mean_e2el_ms']:.0f} ms"
    )


def plot(rows: list[dict], path) -> None:
    import matplotlib

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for system, style in (("disagg", "o-"), ("colocated", "s-"), ("transformers", "^--")):
        pts = [(r["concurrency"], r["output_throughput"]) for r in rows if r["system"] == system]
        ax.plot(*zip(*pts, strict=True), style, label=system)
    ax.set(xscale="log", xlabel="concurrency", ylabel="output tokens / s")
    ax.set_xticks(sorted({r["concurrency"] for r in rows}), labels=None)
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title("Output throughput vs concurrency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prompts-per-slot", type=int, default=2, help="prompts = this x concurrency")
    p.add_argument("--min-prompts", type=int, default=4)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--output", default=None, help="default: results/compare_serving_<device>.json")
    args = p.parse_args()
    rows = baton_rows(args, "disagg") + baton_rows(args, "colocated") + hf_rows(args)
    name = f"compare_serving_{args.device}"
    out = save_result(name, {"args": vars(args), "rows": rows}, args.output)
    png = out.with_suffix(".png")
    plot(rows, png)
    print(f"saved {out} and {png}")


if __name__ == "__main__":
    main()
