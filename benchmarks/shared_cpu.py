"""Serving on a shared CPU: TPOT with and without another busy process, and what an idle worker
costs.

`baton serve` (1 prefill + 1 decode worker by default, its own thread plan) is loaded by the
`baton bench` client with streamed completions of random token prompts at each concurrency, once
alone and once beside `--hogs` unrelated busy processes (each a Python loop that keeps one core
at 100%), the two runs interleaved. Then, with no load, the CPU time the router and each worker
use over `--idle-seconds`, as a percentage of one core.

Targets: with one busy process, TPOT at most 2x of TPOT alone (llama.cpp's server, same model,
2 threads: 1.7x); an idle worker under 2% of a core.

    python benchmarks/shared_cpu.py                                  # c = 1 and 4, smollm2, CPU
    python benchmarks/shared_cpu.py --serve-args "--thread-wait-policy active" --output /tmp/a.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import time

import httpx
from common import save_result, served

from baton.bench import datasets
from baton.bench.metrics import compute_metrics
from baton.bench.runner import LoadConfig, run_load

TPOT_RATIO_TARGET = 2.0
IDLE_TARGET_PCT = 2.0
HOG = "while True: pass"


@contextlib.contextmanager
def busy_processes(n: int):
    procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def load(url: str, args, c: int, seed: int) -> dict:
    n = max(args.min_requests, args.requests_per_slot * c)
    reqs = datasets.random_requests(n + 1, args.input_len, args.output_len, 0.0, False, seed)
    cfg = LoadConfig(base_url=url, max_concurrency=c, num_warmups=1, progress=False)
    results, duration = asyncio.run(run_load(reqs, cfg))
    m = compute_metrics(results[1:], duration)
    if m["failed"]:
        raise RuntimeError(f"c={c}: {m['error_counts']}")
    keys = ("completed", "output_throughput", "median_ttft_ms", "median_tpot_ms", "mean_itl_ms")
    return {k: m[k] for k in keys}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def idle_cpu(url: str, seconds: float) -> dict[str, float]:
    """Percent of one core each process used while nothing was asked of it."""
    workers = httpx.get(url + "/workers", timeout=10).json()
    pids = {f"{w['role']} worker": w["pid"] for w in workers}
    time.sleep(2.0)  # let the last request's threads settle
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return {name: 100 * (cpu_seconds(pid) - before[name]) / dt for name, pid in pids.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--requests-per-slot", type=int, default=3, help="requests = this x c")
    p.add_argument("--min-requests", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2, help="alone/busy pairs per concurrency")
    p.add_argument("--hogs", type=int, default=1, help="busy processes beside the server")
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--mode", default="disagg", choices=["disagg", "colocated"])
    p.add_argument("--serve-args", default="", help="more `baton serve` flags, one string")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-gib", type=float, default=0.5)
    p.add_argument("--output", default=None, help="default: results/shared_cpu_<mode>.json")
    args = p.parse_args()

    runs: list[dict] = []
    rows: list[dict] = []
    with served(args, args.mode, shlex.split(args.serve_args)) as url:
        workers = httpx.get(url + "/workers", timeout=10).json()
        for c in args.concurrency:
            tpots: dict[int, list[float]] = {0: [], args.hogs: []}
            for rep in range(args.repeats):
                for hogs in (0, args.hogs):
                    with busy_processes(hogs):
                        r = {"concurrency": c, "busy": hogs, "repeat": rep}
                        r |= load(url, args, c, seed=1000 * c + 10 * rep + hogs)  # no prefix hits
                    runs.append(r)
                    tpots[hogs].append(r["median_tpot_ms"])
                    print(
                        f"c={c} busy={hogs}: TPOT {r['median_tpot_ms']:.1f} ms, "
                        f"TTFT {r['median_ttft_ms']:.0f} ms, {r['output_throughput']:.1f} tok/s",
                        flush=True,
                    )
            alone = statistics.median(tpots[0])
            busy = statistics.median(tpots[args.hogs])
            rows.append(
                {
                    "concurrency": c,
                    "tpot_alone_ms": alone,
                    "tpot_busy_ms": busy,
                    "ratio": busy / alone,
                    "target": TPOT_RATIO_TARGET,
                    "met": busy / alone <= TPOT_RATIO_TARGET,
                }
            )
        idle = idle_cpu(url, args.idle_seconds)
    print(f"\n{'c':>3} {'TPOT alone':>11} {'TPOT busy':>10} {'ratio':>6}  target <= 2x")
    for r in rows:
        print(
            f"{r['concurrency']:>3} {r['tpot_alone_ms']:>9.1f}ms {r['tpot_busy_ms']:>8.1f}ms "
            f"{r['ratio']:>5.2f}x  {'met' if r['met'] else 'MISSED'}"
        )
    for name, pct in idle.items():
        flag = "met" if pct < IDLE_TARGET_PCT else "MISSED"
        print(f"idle {name}: {pct:.2f}% of a core ({flag}, target < {IDLE_TARGET_PCT}%)")
    out = save_result(
        f"shared_cpu_{args.mode}",
        {
            "args": vars(args),
            "workers": [{"role": w["role"], "cpu": w.get("cpu")} for w in workers],
            "rows": rows,
            "runs": runs,
            "idle_cpu_pct": idle,
            "idle_target_pct": IDLE_TARGET_PCT,
        },
        args.output,
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
