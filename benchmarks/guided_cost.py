"""Guided decoding's cost per decode step, and what a schema costs to compile.

At each batch size, steady-state decode steps (engine.step(), after prefill and a warm-up) with
every row free, every row constrained by a JSON schema, and half of each; the scenarios of a batch
size are interleaved round by round (so a noisy host drifts evenly over them), and each row reports
the median ms/step and what it adds over free: from the medians of all steps, and paired by round.
The guided work inside those steps is timed on its own (host time of GuidedDecoding.bitmask, the
sampler's apply_bitmask and GuidedDecoding.accept, as the engine calls them), with the share of the
vocabulary the masks allowed; apply_bitmask is also timed alone, synchronized, on [B, vocab] logits.
Then compile times on a fresh GuidedDecoding: the first one (which builds the tokenizer), the
tokenizer alone, and per schema size a new schema (cold) vs the same one again (cached), plus the
admission check every constrained request pays.

Target (the issue): at batch 16 with every row constrained, at most 10% added step time.

The process takes a worker's thread plan before torch loads (see baton.server.cpu_threads).

    python benchmarks/guided_cost.py                                   # batch 1, 16, 64 on CPU
    python benchmarks/guided_cost.py --device cuda                     # -> guided_cost_cuda.json
    python benchmarks/guided_cost.py --quick --output /tmp/g.json      # batch 1 and 4, few steps
"""

from __future__ import annotations

import argparse
import json
import time

from bench.guided_probe import (
    PROMPT,
    STEP_SCHEMA,
    Probe,
    allowed_share,
    isolated,
    json_params,
    measure_compile,
    median,
    ms,
    quantile,
)
from common import save_result

from baton.server.cpu_threads import ThreadConfig, apply_thread_plan, plan_threads

TARGET_BATCH = 16
TARGET_PCT = 10.0


def run_scenario(engine, args, prompts, batch: int, ncon: int, tag: str, valid) -> dict:
    """Admit `batch` rows (the first `ncon` constrained), prefill, warm up, time `args.steps`
    decode steps, then abort them and check what the constrained rows produced."""
    from baton import SamplingParams

    total = args.warmup_steps + args.steps
    spec = json.dumps(STEP_SCHEMA)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        kw = {"guided": "json", "guided_spec": spec} if i < ncon else {}
        params = SamplingParams(max_tokens=total + 16, temperature=0, ignore_eos=True, **kw)
        engine.add_request(rid, prompts[i], params)
    last = {}  # each row's latest output: a row that ended early is gone from the engine

    def keep(outs) -> int:
        last.update((o.request_id, o) for o in outs)
        return len(outs)

    for _ in range(64):  # prefill (chunked or not) until every row has its first token
        keep(engine.step())
        if len(last) == batch and all(o.outputs[0].token_ids for o in last.values()):
            break
    with_matcher = sum(rid in engine.guided for rid in ids)
    steps, masks, applies, accepts, mask_rows, advanced, allowed = [], [], [], [], [], [], []
    with Probe(engine) as probe:
        for _ in range(args.warmup_steps):
            keep(engine.step())
        for _ in range(args.steps):
            probe.reset()
            t0 = time.perf_counter()
            outs = engine.step()
            steps.append(ms(t0))
            masks.append(probe.mask)
            applies.append(probe.apply)
            accepts.append(probe.accept)
            mask_rows.append(probe.mask_rows)
            advanced.append(keep(outs))
            if probe.bitmask is not None:
                allowed.append(allowed_share(probe.bitmask, engine.model_config.vocab_size))
    iso = isolated(engine, ids, args.isolated_reps) if ncon else None
    finals = [engine.abort_request(rid) or last[rid] for rid in ids]
    texts = [f.outputs[0].text for f in finals]
    return {
        "step_ms": steps,
        "mask_ms": masks,
        "apply_ms": applies,
        "accept_ms": accepts,
        "mask_rows": mask_rows,
        "rows_advanced": advanced,
        "allowed_frac": allowed,
        "with_matcher": with_matcher,
        # a row that finished before the abort left its grammar (or completed it): not steady
        "all_running": all(f.outputs[0].finish_reason == "abort" for f in finals),
        "constrained_valid": sum(valid(f.outputs[0].token_ids) for f in finals[:ncon]),
        "free_valid": sum(valid(f.outputs[0].token_ids) for f in finals[ncon:]),
        "constrained_start_brace": sum(t.lstrip().startswith("{") for t in texts[:ncon]),
        "isolated": iso,
        "sample_constrained": texts[0][:160] if ncon else None,
        "sample_free": texts[-1][:160] if ncon < batch else None,
    }


def make_prompts(engine, n: int, length: int) -> list[list[int]]:
    """`n` distinct prompts of exactly `length` tokens."""
    tok = engine.tokenizer
    body = tok.encode(" " + PROMPT)
    while len(body) < length:
        body += body
    return [(tok.encode(f"Request {i}.") + body)[:length] for i in range(n)]


def scenarios_of(batch: int) -> list[tuple[str, int]]:
    half = [("half", batch // 2)] if batch >= 2 else []
    return [("free", 0), ("json", batch), *half]


def summarize(batch: int, name: str, ncon: int, runs: list[dict], free_runs: list[dict]) -> dict:
    """One table row. `added_pct`: from the medians of all its steps and of all free steps;
    `added_pct_paired`: the median over rounds of each round's ratio to the free run of the same
    round (what drifts on a shared host between rounds cancels out)."""
    cat = lambda k: [x for r in runs for x in r[k]]
    steps = cat("step_ms")
    guided = [
        m + a + c for m, a, c in zip(cat("mask_ms"), cat("apply_ms"), cat("accept_ms"), strict=True)
    ]
    med = median(steps)
    free_ms = None if name == "free" else median([x for r in free_runs for x in r["step_ms"]])
    paired = [
        100 * (median(r["step_ms"]) / median(f["step_ms"]) - 1)
        for r, f in zip(runs, free_runs, strict=True)
    ]
    isos = [r["isolated"] for r in runs if r["isolated"]]
    row = {
        "batch": batch,
        "scenario": name,
        "constrained": ncon,
        "step_ms_median": med,
        "step_ms_p25": quantile(steps, 0.25),
        "step_ms_p75": quantile(steps, 0.75),
        "added_ms": None if free_ms is None else med - free_ms,
        "added_pct": None if free_ms is None else 100 * (med - free_ms) / free_ms,
        "added_pct_paired": None if free_ms is None else median(paired),
        "added_pct_rounds": None if free_ms is None else paired,
        "in_step": {
            "mask_ms": median(cat("mask_ms")),
            "apply_ms": median(cat("apply_ms")),
            "accept_ms": median(cat("accept_ms")),
            "guided_ms": median(guided),
            "guided_pct_of_free": None if free_ms is None else 100 * median(guided) / free_ms,
        },
        "allowed_frac": median(cat("allowed_frac")),
        "isolated": None
        if not isos
        else {k: median([i[k] for i in isos]) for k in ("bitmask_same_state_ms", "apply_ms")},
        "with_matcher": [r["with_matcher"] for r in runs],
        "mask_rows": sorted(set(cat("mask_rows"))),
        "rows_advanced": sorted(set(cat("rows_advanced"))),
        "all_running": all(r["all_running"] for r in runs),
        "constrained_valid": [r["constrained_valid"] for r in runs],
        "constrained_start_brace": [r["constrained_start_brace"] for r in runs],
        "free_valid": [r["free_valid"] for r in runs],
        "sample_constrained": runs[0]["sample_constrained"],
        "sample_free": runs[0]["sample_free"],
        "step_ms": steps,
    }
    return row


def measure_steps(engine, args, valid) -> list[dict]:
    prompts = make_prompts(engine, max(2, *args.batch_sizes), args.prompt_len)
    g = engine.guided  # compile the rows' schema now: no row waits for it inside a scenario
    g.start("warm", json_params(json.dumps(STEP_SCHEMA)), [])
    g.ready("warm", wait=True)
    g.release("warm")
    warm = argparse.Namespace(**{**vars(args), "steps": 2, "warmup_steps": 1})
    run_scenario(engine, warm, prompts, 2, 1, "warm", valid)  # first-call costs, untimed
    rows = []
    for batch in args.batch_sizes:
        scen = scenarios_of(batch)
        runs: dict[str, list[dict]] = {name: [] for name, _ in scen}
        t0 = time.perf_counter()
        for r in range(args.rounds):
            for name, ncon in scen[r % len(scen) :] + scen[: r % len(scen)]:  # rotate the order
                runs[name].append(
                    run_scenario(engine, args, prompts, batch, ncon, f"b{batch}-{name}-{r}", valid)
                )
        for name, ncon in scen:
            rows.append(summarize(batch, name, ncon, runs[name], runs["free"]))
        print(f"batch {batch}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


# ---- report -------------------------------------------------------------------------------------


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_tables(rows: list[dict], comp: dict, target: dict) -> None:
    pct = lambda x: "-" if x is None else f"{x:+.1f}%"
    print(
        "\nms per decode step (median; p25-p75), added over free (medians; paired by round), and"
        "\nthe guided work inside the step (ms, host time; guided% = its sum over a free step)"
    )
    print(
        f"{'batch':>5} {'rows':>5} {'constr':>6} {'ms/step':>8} {'p25-p75':>13} {'added':>7} "
        f"{'paired':>7} | {'mask':>5} {'apply':>6} {'accept':>6} {'guided%':>7} {'allowed':>7} "
        f"| {'apply alone':>11}"
    )
    for r in rows:
        s, i = r["in_step"], r["isolated"] or {}
        spread = f"{r['step_ms_p25']:.1f}-{r['step_ms_p75']:.1f}"
        allowed = "-" if r["allowed_frac"] is None else f"{r['allowed_frac']:.1%}"
        print(
            f"{r['batch']:>5} {r['scenario']:>5} {r['constrained']:>6} {r['step_ms_median']:>8.1f} "
            f"{spread:>13} {pct(r['added_pct']):>7} {pct(r['added_pct_paired']):>7} | "
            f"{s['mask_ms']:>5.2f} {s['apply_ms']:>6.2f} {s['accept_ms']:>6.2f} "
            f"{fmt(s['guided_pct_of_free'], '.1f'):>7} {allowed:>7} | {fmt(i.get('apply_ms')):>11}"
        )
    print(
        f"\ncompile: first (with the tokenizer) {comp['first_compile_incl_tokenizer_ms']:.1f} ms; "
        f"tokenizer alone {comp['tokenizer_build_ms']:.1f} ms"
    )
    print(f"{'schema':>8} {'bytes':>7} {'cold ms':>8} {'cached ms':>10} {'check ms':>9}")
    for s in comp["schemas"]:
        print(
            f"{s['schema']:>8} {s['spec_bytes']:>7} {s['cold_ms']:>8.2f} {s['cached_ms']:>10.3f} "
            f"{s['check_ms']:>9.2f}"
        )
    if target["met"] is None:
        print(
            f"\ntarget (batch {TARGET_BATCH}, every row constrained, <= {TARGET_PCT:g}%): not run"
        )
    else:
        print(
            f"\ntarget: batch {TARGET_BATCH}, every row constrained: {target['added_pct']:+.1f}% "
            f"step time (paired by round {target['added_pct_paired']:+.1f}%; guided work in the "
            f"step {target['guided_pct_of_free']:.1f}% of a free step), target <= {TARGET_PCT:g}%: "
            f"{'met' if target['met'] else 'MISSED'}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per scenario run")
    ap.add_argument(
        "--warmup-steps",
        type=int,
        default=8,
        help="decode steps before timing (past the opening keys: names, ages and tags are timed)",
    )
    ap.add_argument("--rounds", type=int, default=5, help="interleaved runs of every scenario")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--isolated-reps", type=int, default=20)
    ap.add_argument("--compile-reps", type=int, default=3)
    ap.add_argument("--cpu-linear", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--thread-wait-policy", default="auto")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 4, 1 round of 3 steps")
    ap.add_argument("--output", default=None, help="default: results/guided_cost_<device>.json")
    args = ap.parse_args()
    if args.quick:
        args.batch_sizes, args.steps, args.warmup_steps, args.rounds = [1, 4], 3, 1, 1
        args.isolated_reps, args.compile_reps = 3, 1

    # NOTE: before torch loads, as a worker does: OpenMP reads its waiting policy once.
    plan = plan_threads(ThreadConfig(threads=args.threads, wait_policy=args.thread_wait_policy))
    apply_thread_plan(plan)

    from baton import LLM

    max_tokens = args.warmup_steps + args.steps + 16  # as run_scenario asks
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        # what the largest batch needs, with room to spare (the device's budget would fill a GPU)
        num_kv_blocks=max(args.batch_sizes) * (-(-(args.prompt_len + max_tokens) // 16) + 1) + 64,
        block_size=16,
        max_num_seqs=max(args.batch_sizes),
        cpu_linear=args.cpu_linear,
        show_progress=False,
    )
    engine = llm.engine
    print(f"loaded {engine.model_name} on {engine.device}/{engine.dtype} in {ms(t0) / 1e3:.1f} s")
    print(plan.describe(), flush=True)

    comp, tok = measure_compile(engine, args.compile_reps)

    import llguidance

    from baton.server.guided.grammar import grammar_for

    template = llguidance.LLMatcher(tok, grammar_for("json", json.dumps(STEP_SCHEMA)), log_level=0)

    def valid(token_ids: list[int]) -> bool:
        """A fresh matcher takes every token: the output is a prefix of the schema's JSON."""
        return bool(token_ids) and template.deep_copy().try_consume_tokens(token_ids) == len(
            token_ids
        )

    rows = measure_steps(engine, args, valid)
    at = [r for r in rows if r["batch"] == TARGET_BATCH and r["scenario"] == "json"]
    target = {"batch": TARGET_BATCH, "max_added_pct": TARGET_PCT, "added_pct": None, "met": None}
    if at:
        target |= {
            "added_pct": at[0]["added_pct"],
            "added_pct_paired": at[0]["added_pct_paired"],
            "guided_pct_of_free": at[0]["in_step"]["guided_pct_of_free"],
            "met": at[0]["added_pct"] <= TARGET_PCT,
        }
    print_tables(rows, comp, target)
    device = engine.device.type
    path = save_result(
        f"guided_cost_{device}",
        {
            "args": vars(args),
            "engine": {
                "model": engine.model_name,
                "device": str(engine.device),
                "dtype": str(engine.dtype).removeprefix("torch."),
                "vocab_size": engine.model_config.vocab_size,
                "cpu_linear": str(engine.cpu_linear),
                "attention_backend": engine.runner.backend.name,
                "threads": plan.as_dict(),
            },
            "step_schema": STEP_SCHEMA,
            "steps": rows,
            "compile": comp,
            "target": target,
        },
        args.output,
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
