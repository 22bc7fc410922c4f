"""Kernel benchmarks on one GPU: the device's own ceilings first, then each kernel against torch's
best in the same run, each as a fraction of those ceilings, and each section against a target.

- ceilings: a 1 GiB device-to-device copy (read + write bytes / time) and an 8192^3 bf16 matmul;
- prefill: the extend kernel with an empty prefix vs SDPA's flash backend, causal, bf16, d=128,
  32 query / 8 KV heads, at 1k, 4k and 16k tokens (TFLOP/s, causal FLOPs).
  Target: >= 1.2x flash SDPA and >= 480 TFLOP/s at 4k tokens;
- decode: paged split-KV decode (16-token pages, the engine's) vs SDPA on padded contiguous KV
  (flash backend, else efficient; the row names the one that ran) and vs FlexAttention,
  batch 1..256, context 1k..32k (bytes of K, V and Q read / time). FlexAttention is compiled
  once with dynamic shapes and reads its own cache of 128-token pages (its block size), so each
  block of its block mask is one page of the sequence and it reads the same bytes as ours; ours
  is also timed on that layout (`ours_p128`). Target: >= 90% of the copy bandwidth at batch 64,
  4k context;
- step: one decode step of a Llama-3-8B-shaped dummy model (one engine, CUDA graphs on) at batch
  1, 64, 256: the graph replay alone (GPU time) and the whole step (wall clock, host included),
  each against its floor (bytes read / copy bandwidth; see baton.bench.decode_step).
  Target: the step within 1.25x its floor at batch 64.

Results are saved after every section (the file holds all measured so far); a section that misses
its target leaves a profiler trace (chrome JSON) of the missing case beside them. Needs only
torch, triton and transformers (no HTTP or ZeroMQ parts).

    python benchmarks/kernels.py                       # everything, results/kernels_<gpu>.json
    python benchmarks/kernels.py --sections decode --batches 64 --contexts 4096
    python benchmarks/kernels.py --output-dir "$OUT"    # results and traces there
"""

from __future__ import annotations

import argparse
import re
import traceback
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import baton  # noqa: F401
except ImportError:  # a bare GPU machine: map the packages as gpu_check does
    from gpu_check import install_baton

    install_baton()

from common import RESULTS_DIR, save_result

from baton.bench.decode_baselines import (
    BLOCK,
    DTYPE,
    FLEX_PAGE,
    HKV,
    D,
    H,
    flex_decode,
    flex_inputs,
    flex_prepare,
    padded,
    paged_inputs,
    sdpa_decode,
)
from baton.bench.decode_step import step as step_section
from baton.bench.kernel_timing import Target, bench, ceilings, l2_bytes, rotations

sdpa = F.scaled_dot_product_attention

MAX_KV_BYTES = 24 << 30  # skip decode shapes whose KV (or its padded copy) would not fit
SHAPES = {"heads": H, "kv_heads": HKV, "head_dim": D, "block_size": BLOCK, "dtype": "bfloat16"}
# Imported inside the sections; gpu_check's dry run imports them to check the machine has them.
RUNTIME_MODULES = [
    "baton.kernels.decode_attention",
    "baton.kernels.extend_attention",
    "baton.server.engine",
    "torch.nn.attention",
    "torch.nn.attention.flex_attention",
    "torch.profiler",
    "triton.testing",
]


# ---- prefill -------------------------------------------------------------------------------------


def prefill(args, ceil: dict, out_dir: Path) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from baton.kernels.extend_attention import extend_attention

    target = Target("ours >= 1.2x flash SDPA and >= 480 TFLOP/s", {"tokens": 4096})
    rows = []
    for n in args.prefill_lens:
        q = torch.randn(n, H, D, dtype=DTYPE, device="cuda")
        k = torch.randn(n, HKV, D, dtype=DTYPE, device="cuda")
        v = torch.randn(n, HKV, D, dtype=DTYPE, device="cuda")
        cache = torch.zeros(1, 2, BLOCK, HKV, D, dtype=DTYPE, device="cuda")  # no prefix
        tables = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
        qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        lens = torch.tensor([n], dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        scale = D**-0.5
        ours = partial(
            extend_attention,
            *(q, k, v, cache[:, 0], cache[:, 1], tables, qsl, lens, n, scale),
            out=out,
        )
        t_ours = bench(ours)
        # SDPA's flash backend wants equal head counts: K/V expanded once, outside the timing.
        qq = q.transpose(0, 1)[None]
        kk = k.repeat_interleave(H // HKV, 1).transpose(0, 1)[None].contiguous()
        vv = v.repeat_interleave(H // HKV, 1).transpose(0, 1)[None].contiguous()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t_sdpa = bench(partial(sdpa, qq, kk, vv, is_causal=True, scale=scale))
        flops = 4 * n * n * H * D / 2  # QK^T and PV, half of the square under the causal mask
        row = {
            "tokens": n,
            "ours_tflops": flops / t_ours / 1e12,
            "sdpa_flash_tflops": flops / t_sdpa / 1e12,
            "ours_ms": t_ours * 1e3,
            "sdpa_flash_ms": t_sdpa * 1e3,
        }
        row["vs_sdpa"] = row["ours_tflops"] / row["sdpa_flash_tflops"]
        row["of_matmul_ceiling"] = row["ours_tflops"] / ceil["matmul_tflops"]
        print(
            f"prefill {n:>6}: ours {row['ours_tflops']:.0f} TF/s, "
            f"flash SDPA {row['sdpa_flash_tflops']:.0f} TF/s ({row['vs_sdpa']:.2f}x)"
        )
        if n == target.case["tokens"]:
            met = row["vs_sdpa"] >= 1.2 and row["ours_tflops"] >= 480
            got = {k: row[k] for k in ("ours_tflops", "sdpa_flash_tflops", "vs_sdpa")}
            target.record(met, got, ours, out_dir / f"trace_prefill_{n}.json")
        rows.append(row)
    return {"rows": rows, "target": asdict(target)}


# ---- decode --------------------------------------------------------------------------------------


def paged_decode(q, k_cache, v_cache, tables, lens, scale, page=BLOCK):
    from baton.kernels.decode_attention import decode_attention

    kc = k_cache.view(-1, page, HKV, D) if k_cache.dim() == 3 else k_cache
    vc = v_cache.view(-1, page, HKV, D) if v_cache.dim() == 3 else v_cache
    return decode_attention(q, kc, vc, tables, lens, scale)


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def sdpa_row(sets: list, nbytes: int, scale: float) -> dict:
    """SDPA over padded copies of the paged inputs, and the backend that ran."""
    row = {}
    try:
        padded_sets = [padded(*s) for s in sets]
        fn, row["sdpa_backend"] = sdpa_decode(*padded_sets[0], scale)
        row["sdpa_padded_gbps"] = nbytes / bench(fn, rotate=padded_sets) / 1e9
    except Exception as e:
        row["sdpa_error"] = _error(e)
    return row


def flex_row(b: int, ctx: int, n_sets: int, gen, nbytes: int, scale: float) -> dict:
    """Ours and FlexAttention on 128-token pages, and how far flex's output is from ours."""
    row = {}
    try:
        if ctx % FLEX_PAGE:
            raise ValueError(f"context is not a multiple of {FLEX_PAGE}")
        sets = [flex_inputs(b, ctx, gen) for _ in range(n_sets)]
        p128 = partial(paged_decode, scale=scale, page=FLEX_PAGE)
        row["ours_p128_gbps"] = nbytes / bench(p128, rotate=sets) / 1e9
        ref = p128(*sets[0]).float()
        sets = [flex_prepare(*s) for s in sets]
        got = flex_decode(*sets[0], scale).float()
        row["flex_max_diff_vs_ours"] = float((got - ref).abs().max())
        row["flex_p128_gbps"] = nbytes / bench(partial(flex_decode, scale=scale), rotate=sets) / 1e9
    except Exception as e:  # a torch without FlexAttention, or one that refuses the mask
        row["flex_error"] = _error(e)
    return row


def decode(args, ceil: dict, out_dir: Path) -> dict:
    case = {"batch": 64, "context": 4096}
    target = Target("ours >= 90% of the measured copy bandwidth", case)
    gen = torch.Generator().manual_seed(0)
    scale, l2, rows = D**-0.5, l2_bytes(), []
    for b in args.batches:
        for ctx in args.contexts:
            kv_bytes = 2 * b * ctx * HKV * D * DTYPE.itemsize
            row = {"batch": b, "context": ctx}
            if kv_bytes > MAX_KV_BYTES:
                rows.append({**row, "skipped": f"KV over {MAX_KV_BYTES >> 30} GiB"})
                continue
            nbytes = kv_bytes + b * H * D * DTYPE.itemsize
            row["bytes"] = nbytes
            # Rotate inputs so the measured reads come from HBM, not L2.
            n_sets = rotations(kv_bytes, l2) if 2 * kv_bytes <= MAX_KV_BYTES else 1
            row["input_sets"] = n_sets
            sets = [paged_inputs(b, ctx, gen) for _ in range(n_sets)]
            t = bench(partial(paged_decode, scale=scale), rotate=sets)
            row["ours_gbps"] = nbytes / t / 1e9
            row["ours_of_copy"] = row["ours_gbps"] / ceil["copy_gbps"]
            if (b, ctx) == (case["batch"], case["context"]):
                got = {k: row[k] for k in ("ours_gbps", "ours_of_copy")}
                got["copy_gbps"] = ceil["copy_gbps"]
                run_once = partial(paged_decode, *sets[0], scale)
                target.record(
                    row["ours_of_copy"] >= 0.9, got, run_once, out_dir / "trace_decode.json"
                )
            if 2 * kv_bytes <= MAX_KV_BYTES:  # SDPA on padded contiguous KV (copied once)
                row.update(sdpa_row(sets, nbytes, scale))
            sets = None
            torch.cuda.empty_cache()
            row.update(flex_row(b, ctx, n_sets, gen, nbytes, scale))
            others = {k: v for k, v in row.items() if k.endswith("_gbps") and k != "ours_gbps"}
            print(
                f"decode b={b:>3} ctx={ctx:>5}: ours {row['ours_gbps']:.0f} GB/s "
                f"({row['ours_of_copy']:.0%} of copy)"
                + "".join(f", {k[:-5]} {v:.0f}" for k, v in others.items())
            )
            rows.append(row)
            torch.cuda.empty_cache()
    return {"rows": rows, "target": asdict(target)}


# ---- one decode step of an 8B-shaped model ------------------------------------------------------


def step(args, ceil: dict, out_dir: Path) -> dict:
    target = Target("engine.step() within 1.25x its memory floor", {"batch": 64})
    rows = step_section(args, ceil, out_dir, target)
    return {"rows": rows, "target": asdict(target)}


SECTIONS = {"prefill": prefill, "decode": decode, "step": step}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--prefill-lens", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384, 32768])
    p.add_argument("--step-batches", nargs="+", type=int, default=[1, 64, 256])
    p.add_argument("--step-context", type=int, default=1024)
    p.add_argument("--step-iters", type=int, default=20, help="timed steps per batch size")
    p.add_argument("--step-model", default="llama-3-8b", help="a shipped config, loaded dummy")
    p.add_argument("--output-dir", default=str(RESULTS_DIR), help="results and traces")
    p.add_argument("--output", default=None, help="the results file (default: in --output-dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py measures a GPU; this machine has none")
    torch.manual_seed(0)
    gpu = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")
    path = Path(args.output or Path(args.output_dir) / f"kernels_{gpu}.json")
    results: dict = {"shapes": SHAPES, "ceilings": ceilings(DTYPE)}
    save = partial(save_result, f"kernels_{gpu}", path=str(path))
    save({"args": vars(args), **results})
    failed = False
    for name in args.sections:
        try:
            results[name] = SECTIONS[name](args, results["ceilings"], path.parent)
        except Exception:
            traceback.print_exc()
            results[name] = {"error": traceback.format_exc()[-3000:]}
            failed = True
        torch.cuda.empty_cache()
        save({"args": vars(args), **results})  # what was measured so far survives a crash
    for name in args.sections:
        t = results[name].get("target")
        if t:
            verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            trace = f" (trace {t['trace']})" if t.get("trace") else ""
            print(f"target {name}: {t['rule']} at {t['case']}: {verdict}{trace}")
    print(f"saved {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
