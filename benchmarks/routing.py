"""KV-aware routing vs least-loaded vs round-robin, conditional disaggregation off and on, on 2
prefill + 2 decode CPU workers (one thread each) run as real processes (baton.bench.cluster).

Per policy (--routing) and --max-local-prefill-tokens (0: all handed off; 32: a decode worker
prefills what has at most 32 tokens uncached there, or 128 for a next turn whose history it
holds: --max-local-turn-tokens 128), a fresh cluster runs multi-turn chats (`baton
bench --dataset multi-turn`: each user waits --think-time, 2 s on average, after an answer;
and other chats in lockstep, every turn of every chat sent at once), shared-prefix token
prompts, and random ones (what kv costs when nothing is cached), reading router /metrics around
each (and in multi-turn once every first turn is in). Reported: TTFT p50/p90; prefix hit rate
of each pool (hit over queried tokens, summed over its workers); prompt tokens computed (usage:
prompt - cached); KV bytes shipped and skipped per turn after the first; placements by path;
output tok/s. Targets, kv vs load: multi-turn >= 2x fewer prompt tokens computed, >= 1.5x lower
median TTFT, >= 50% fewer KV bytes per later turn; random <= 5% less output throughput. The
lockstep chats' figures are reported beside them: there every later turn of a worker's chats
lands at once, and TTFT is the time to compute them all.

NOTE: a cluster per configuration, not per workload: the workloads share no prompt tokens (own
seeds; chat text vs token ids) and the KV cache holds them all, so each starts cold for its own
prompts, and 18 cluster starts (~20 s each on 2 cores) are saved.

    python benchmarks/routing.py          # ~45 min on 2 cores: results/routing_cpu.json, .png
    python benchmarks/routing.py --quick  # tiny: load vs kv, local prefill off, to a temp dir
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from bench.routing_report import (
    KEY,
    Metrics,
    check_targets,
    delta,
    find_row,
    format_checks,
    format_rows,
    scrape,
    summarize,
)
from common import RESULTS_DIR, save_result

from baton.bench import datasets, multi_turn
from baton.bench.cluster import Cluster
from baton.bench.metrics import compute_metrics
from baton.bench.runner import LoadConfig, run_load

POLICIES = ("round-robin", "load", "kv")
LOCAL = (0, 32)
WORKLOADS = ("multi-turn", "multi-turn-lockstep", "shared-prefix", "random")


def workers(args) -> dict[str, tuple[str, ...]]:
    flags = ("--threads", str(args.threads), "--kv-cache-gib", str(args.kv_cache_gib))
    return {"p0": ("prefill", *flags), "p1": ("prefill", *flags),
            "d0": ("decode", *flags), "d1": ("decode", *flags)}  # fmt: skip


def warm_up(url: str) -> None:
    """First-request costs out of the way on every worker: short prompts (some prefilled on a
    decode worker when local prefill is on) and longer ones, a few at once."""
    for n in (16, 48):
        reqs = datasets.random_requests(4, n, 2, 0.0, chat=False, seed=900 + n)
        cfg = LoadConfig(base_url=url, num_warmups=0, progress=False)
        results, _ = asyncio.run(run_load(reqs, cfg))
        if not all(r.success for r in results):
            raise RuntimeError(f"warm-up failed: {[r.error for r in results]}")


def quiet(c: Cluster) -> Metrics:
    """Metrics once the workers are idle and their prefix-cache totals (heartbeats) are in."""
    c.wait_idle(timeout=60)
    time.sleep(2.2)  # two heartbeats
    return scrape(c.url)


def run_workload(c: Cluster, args, workload: str) -> tuple[dict, list, Metrics | None]:
    """(compute_metrics' summary, the TurnResults, multi-turn: metrics once first turns are in)."""
    at_first: list[Metrics] = []
    if workload.startswith("multi-turn"):
        endpoint = "/v1/chat/completions"
        cfg = LoadConfig(base_url=c.url, endpoint=endpoint, num_warmups=0, progress=False)
        # NOTE: the lockstep chats are others (seed, numbers): nothing cached from the first
        lockstep = workload != "multi-turn"
        convs = multi_turn.make_conversations(
            args.conversations, args.turns, args.turn_input_len, 0.0, seed=11 if lockstep else 1,
            first=1000 if lockstep else 0,
        )  # fmt: skip
        hook = lambda: at_first.append(scrape(c.url))  # noqa: E731
        think = 0.0 if lockstep else args.think_time
        run = multi_turn.run_multi_turn(convs, cfg, args.answer_len, hook, think_time=think)
    else:
        cfg = LoadConfig(
            base_url=c.url, num_warmups=0, max_concurrency=args.max_concurrency, progress=False
        )
        if workload == "shared-prefix":
            reqs = datasets.shared_prefix_requests(
                args.shared_requests, args.num_groups, args.prefix_len, args.shared_input_len,
                args.shared_output_len, chat=False, seed=2,
            )  # fmt: skip
        else:
            reqs = datasets.random_requests(
                args.random_requests, args.random_input_len, args.output_len, 0.0, False, seed=3
            )
        run = run_load(reqs, cfg)
    results, duration = asyncio.run(run)
    return compute_metrics(results, duration), results, (at_first[0] if at_first else None)


def run_config(args, policy: str, local: int, log_dir: Path) -> tuple[list[dict], dict]:
    # local on: the router's defaults for a next turn too (--max-local-turn-tokens 128)
    turn = "0" if local == 0 else "128"
    router_args = ("--routing", policy, "--max-local-prefill-tokens", str(local))
    router_args += ("--max-local-turn-tokens", turn)
    t0 = time.monotonic()
    rows = []
    with Cluster.running(workers(args), router_args=router_args, log_dir=log_dir) as c:
        start_s = time.monotonic() - t0
        states = c.worker_states()
        roles = {w: s["role"] for w, s in states.items()}
        warm_up(c.url)
        before = quiet(c)
        for workload in args.workloads:
            bench, results, at_first = run_workload(c, args, workload)
            after = quiet(c)
            later = delta(at_first, after) if at_first is not None else None
            row = dict(zip(KEY, (workload, policy, local), strict=True))
            row |= summarize(bench, results, delta(before, after), roles, later)
            rows.append(row)
            print(format_rows([row]).splitlines()[-1], flush=True)
            before = after  # nothing ran in between
    info = {
        "policy": policy,
        "max_local_prefill_tokens": local,
        "cluster_start_s": start_s,
        "seconds": time.monotonic() - t0,
        "workers": [{"id": w, "role": s["role"], "cpu": s.get("cpu")} for w, s in states.items()],
    }
    return rows, info


def plot(rows: list[dict], path: Path) -> Path:
    from baton.bench.plots import pyplot

    plt = pyplot()
    configs = sorted(
        {(r["max_local_prefill_tokens"], r["policy"]) for r in rows},
        key=lambda c: (c[0], POLICIES.index(c[1])),
    )
    labels = [f"{p}\nlocal {n}" for n, p in configs]
    panels = [
        ("multi-turn", "median_ttft_ms", "multi-turn: median TTFT (ms)", 1),
        ("multi-turn", "prompt_tokens_computed", "multi-turn: prompt tokens computed", 1),
        ("multi-turn", "kv_bytes_per_later_turn", "multi-turn: KV MiB per turn > 1", 2**20),
        ("shared-prefix", "median_ttft_ms", "shared-prefix: median TTFT (ms)", 1),
        ("shared-prefix", "prompt_tokens_computed", "shared-prefix: prompt tokens computed", 1),
        ("random", "output_throughput", "random: output tok/s", 1),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (workload, key, title, scale) in zip(axes.flat, panels, strict=True):
        vals = []
        for n, p in configs:
            r = find_row(rows, workload, p, n)
            vals.append(r[key] / scale if r and r.get(key) is not None else 0.0)
        colors = ["C0" if p == "round-robin" else "C1" if p == "load" else "C2" for _, p in configs]
        ax.bar(range(len(configs)), vals, color=colors)
        ax.set_xticks(range(len(configs)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle("Routing policies, 2 prefill + 2 decode CPU workers (1 thread each)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# name: (default, --quick's, help)
SIZES = {
    # NOTE: 16 conversations (vLLM's multi-turn benchmark generates 24): with 8, load's chance
    # hits (a later turn landing where its history is) decided kv vs load run to run.
    "conversations": (16, 2, "multi-turn: conversations, all at once"),
    # NOTE: 8 user turns, as vLLM's multi-turn benchmark (benchmarks/multi_turn: 12-18 messages,
    # 6-9 user turns); 4 left load's chance hits on one of two decode workers a larger share.
    "turns": (8, 2, "multi-turn: turns per conversation"),
    "turn_input_len": (64, 16, "multi-turn: new user words per turn"),
    "think_time": (2.0, 0.5, "multi-turn: mean seconds between an answer and the next turn"),
    # NOTE: answers run longer than the questions in chat logs; the history a next turn brings
    # back is mostly answers, which only the decode worker that wrote them holds.
    "answer_len": (64, 4, "multi-turn: tokens per answer"),
    "output_len": (32, 4, "random: tokens per answer"),
    "shared_requests": (32, 4, "shared-prefix: requests"),
    "num_groups": (4, 2, "shared-prefix: system prompts"),
    "prefix_len": (256, 64, "shared-prefix: their tokens"),
    "shared_input_len": (32, 8, "shared-prefix: tokens after the prefix"),
    "shared_output_len": (16, 4, "shared-prefix: tokens per answer"),
    "random_requests": (32, 4, "random: requests"),
    "random_input_len": (128, 32, "random: prompt tokens"),
    "max_concurrency": (8, 4, "shared-prefix and random: requests in flight"),
    "kv_cache_gib": (0.5, 0.1, "per worker"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes; load vs kv; local 0 only")
    p.add_argument("--policies", nargs="+", choices=POLICIES, help="default: all")
    p.add_argument("--local", nargs="+", type=int, help="--max-local-prefill-tokens values")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    for name, (default, _, help) in SIZES.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=None, help=help)
    p.add_argument("--threads", type=int, default=1, help="per worker")
    p.add_argument("--output", default=None, help="default: results/routing_cpu.json")
    p.add_argument("--plot", default=None, help="default: beside --output, .png")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, (default, quick, _) in SIZES.items():  # a size given on the command line stays
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    args.policies = args.policies or (["load", "kv"] if args.quick else list(POLICIES))
    args.local = args.local or ([0] if args.quick else list(LOCAL))
    if args.quick and args.output is None:
        args.output = str(Path(tempfile.mkdtemp(prefix="routing-")) / "routing_cpu_quick.json")
    out = Path(args.output) if args.output else RESULTS_DIR / "routing_cpu.json"
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    log_dir = Path(tempfile.mkdtemp(prefix="routing-logs-"))
    rows, configs = [], []
    t0 = time.monotonic()
    for local in args.local:
        for policy in args.policies:
            print(f"== --routing {policy} --max-local-prefill-tokens {local}", flush=True)
            r, info = run_config(args, policy, local, log_dir / f"{policy}-{local}")
            rows += r
            configs.append(info)
    checks = check_targets(rows)
    print(f"\n{format_rows(rows)}\n\n{format_checks(checks) or 'no kv/load pair: no targets'}")
    met = all(c["met"] for c in checks) if checks else None
    payload = {"args": vars(args), "seconds": time.monotonic() - t0, "configs": configs,
               "rows": rows, "targets": checks, "all_targets_met": met}  # fmt: skip
    saved = save_result("routing_cpu", payload, str(out))
    print(f"saved {saved} and {plot(rows, png)} (worker logs in {log_dir})")
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
