"""`baton bench`: load an OpenAI-compatible server, print vLLM-style metrics, save JSON.

baton bench --base-url http://127.0.0.1:8000 --num-prompts 64 --max-concurrency 8
baton bench --endpoint /v1/chat/completions --dataset conversations --request-rate 2
baton bench --endpoint /v1/chat/completions --dataset multi-turn --num-conversations 8 --turns 4
baton bench sweep --max-concurrency 1 2 4 8 --output-dir benchmarks/results/sweep
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from pathlib import Path

from baton.bench import datasets, multi_turn
from baton.bench.machine import command_line, machine_info
from baton.bench.metrics import compute_metrics, format_table, parse_goodput, per_request
from baton.bench.runner import LoadConfig, run_load


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default="", help="default: the server's first model")
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--dataset",
        default="random",
        choices=["random", "shared-prefix", "conversations", "multi-turn"],
    )
    p.add_argument("--dataset-path", default=None, help="conversations: a JSONL file")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths in len*(1 +- r)")
    p.add_argument("--num-groups", type=int, default=4, help="shared-prefix: system prompts")
    p.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: their length")
    p.add_argument("--num-conversations", type=int, default=8, help="multi-turn: clients")
    p.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    p.add_argument(
        "--turn-input-len", type=int, default=64, help="multi-turn: new user words per turn"
    )
    p.add_argument(
        "--think-time",
        type=float,
        default=0.0,
        help="multi-turn: mean seconds a user waits after an answer (exponential; 0: none)",
    )
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1: Poisson")
    p.add_argument("--num-warmups", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", nargs="+", default=None, help="SLOs in ms, e.g. ttft:500 tpot:50")
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--label", default="", help="a name for this run in the result file")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="baton bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_common_args(p)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--save-result", default=None, help="JSON path for the result")
    return p


def build_sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton bench sweep", description="runs, then plots")
    add_common_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--request-rate", type=float, nargs="+", help="one run per rate")
    g.add_argument("--max-concurrency", type=int, nargs="+", help="one run per cap")
    p.add_argument("--output-dir", default="benchmarks/results/sweep")
    return p


def make_requests(args) -> list[datasets.BenchRequest]:
    chat = args.endpoint.rstrip("/").endswith("chat/completions")
    n = args.num_prompts + args.num_warmups
    if args.dataset == "random":
        return datasets.random_requests(
            n, args.input_len, args.output_len, args.range_ratio, chat, args.seed
        )
    if args.dataset == "shared-prefix":
        return datasets.shared_prefix_requests(
            n, args.num_groups, args.prefix_len, args.input_len, args.output_len, chat, args.seed
        )
    return datasets.conversation_requests(n, args.dataset_path, chat, args.seed)


def run_once(args, request_rate: float, max_concurrency: int | None) -> dict:
    """One load run: the summary metrics, the per-request arrays and where they came from."""
    goodput = parse_goodput(args.goodput)
    cfg = LoadConfig(
        base_url=args.base_url,
        endpoint=args.endpoint,
        model=args.model,
        api_key=args.api_key,
        request_rate=request_rate,
        burstiness=args.burstiness,
        max_concurrency=max_concurrency,
        num_warmups=args.num_warmups,
        ignore_eos=not args.no_ignore_eos,
        seed=args.seed,
        progress=not args.no_progress,
    )
    extra: dict = {}
    if args.dataset == "multi-turn":
        convs = multi_turn.make_conversations(
            args.num_conversations, args.turns, args.turn_input_len, args.range_ratio, args.seed
        )
        run = multi_turn.run_multi_turn(convs, cfg, args.output_len, think_time=args.think_time)
        results, duration = asyncio.run(run)
        extra["turns"] = {
            "turn_input_len": args.turn_input_len,
            "think_time": args.think_time,
            "output_len": args.output_len,
            **multi_turn.turn_stats(results),
        }
    else:
        results, duration = asyncio.run(run_load(make_requests(args), cfg))
        results = results[args.num_warmups :] if args.num_warmups else results
    metrics = compute_metrics(results, duration, goodput)
    title = f"{args.label or 'Serving Benchmark Result'}"
    print(format_table(metrics, title))
    if "turns" in extra:
        print(multi_turn.format_turns(extra["turns"]))
    load = dataclasses.asdict(cfg)
    load["request_rate"] = str(request_rate) if request_rate == float("inf") else request_rate
    load.pop("api_key")
    return {
        "label": args.label,
        "dataset": args.dataset,
        "load": load,
        **metrics,
        **per_request(results),
        **extra,
    }


def _save(payload: dict, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    full = {"command": command_line(), "machine": machine_info(), **payload}
    out.write_text(json.dumps(full, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if argv[:1] == ["sweep"]:
        return sweep(build_sweep_parser().parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    result = run_once(args, args.request_rate, args.max_concurrency)
    if args.save_result:
        print(f"saved {_save(result, args.save_result)}")
    return 0 if result["completed"] else 1


def sweep(args) -> int:
    from baton.bench.plots import plot_sweep

    by_rate = args.request_rate is not None
    values = args.request_rate if by_rate else args.max_concurrency
    runs = []
    for v in values:
        rate, cap = (v, None) if by_rate else (float("inf"), v)
        r = run_once(args, rate, cap)
        r["sweep_value"] = v
        runs.append(r)
    out_dir = Path(args.output_dir)
    axis = "request_rate" if by_rate else "max_concurrency"
    saved = _save({"axis": axis, "runs": runs}, out_dir / "sweep.json")
    pngs = plot_sweep(runs, axis, out_dir)
    print(f"saved {saved} and {', '.join(str(p) for p in pngs)}")
    return 0
