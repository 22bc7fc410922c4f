"""routing.py's pure parts: router metrics read and diffed, a run's row, the targets, tables."""

from __future__ import annotations

import re
import time

import httpx

from baton.bench import multi_turn

KEY = ("workload", "policy", "max_local_prefill_tokens")  # a row's configuration
# (name, workload, row key, ratio (load/kv) or cut (1 - kv/load), op, target): kv vs load
TARGETS = (
    ("multi-turn prompt tokens computed, load/kv", "multi-turn", "prompt_tokens_computed",
     "ratio", ">=", 2.0),
    ("multi-turn median TTFT, load/kv", "multi-turn", "median_ttft_ms", "ratio", ">=", 1.5),
    ("multi-turn KV bytes per later turn, kv's cut", "multi-turn", "kv_bytes_per_later_turn",
     "cut", ">=", 0.5),
    ("random output tok/s, kv's cost", "random", "output_throughput", "cut", "<=", 0.05),
)  # fmt: skip

_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Metrics:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out: Metrics = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels, value = m.groups()
        key = (name, tuple(sorted(_LABEL.findall(labels or ""))))
        out[key] = float(value)
    return out


def delta(before: Metrics, after: Metrics) -> Metrics:
    """What each sample grew by (a sample first seen after counts from zero)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def total(m: Metrics, name: str, **labels: str) -> float:
    """The sum of the `name` samples whose labels include `labels`."""
    want = labels.items()
    return sum((v for (n, ls), v in m.items() if n == name and want <= dict(ls).items()), 0.0)


def hit_rate(m: Metrics, roles: dict[str, str], role: str) -> float | None:
    """Prefix cache hits over queries (tokens) summed over the workers of `role`."""
    ids = [w for w, r in roles.items() if r == role]
    queries = sum(total(m, "baton:prefix_cache_queries_total", worker=w) for w in ids)
    hits = sum(total(m, "baton:prefix_cache_hits_total", worker=w) for w in ids)
    return hits / queries if queries else None


def settled(m: Metrics) -> bool:
    """Every handed-off request's KV report is in (its bytes counted)."""
    reports = total(m, "baton:kv_transfer_duration_seconds_count")
    reports += total(m, "baton:kv_transfer_failures_total")
    return reports >= total(m, "baton:requests_placed_total", path="handed_off")


def scrape(url: str, timeout: float = 10.0) -> Metrics:
    """The router's metrics once every KV report of a handed-off request has arrived."""
    deadline = time.monotonic() + timeout
    while True:
        m = parse_metrics(httpx.get(url + "/metrics", timeout=10).text)
        if settled(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


COUNTERS = {
    "router_prompt_tokens": "baton:prompt_tokens_total",
    "routing_cached_prompt_tokens": "baton:routing_cached_prompt_tokens_total",
    "kv_bytes": "baton:kv_transfer_bytes_total",
    "kv_skipped_bytes": "baton:kv_transfer_skipped_bytes_total",
}


def summarize(bench: dict, results: list, d: Metrics, roles: dict, later: Metrics | None) -> dict:
    """A run's row: `bench` from compute_metrics, `results` its TurnResults, `d` the router's
    metrics delta over the run, `later` the delta over the turns after the first (multi-turn)."""
    ok = [r for r in results if r.success]
    prompt, cached = sum(r.prompt_len for r in ok), sum(r.cached_tokens for r in ok)
    keys = ("completed", "failed", "median_ttft_ms", "p90_ttft_ms", "median_tpot_ms")
    row = {k: bench[k] for k in (*keys, "output_throughput")}
    row |= {
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "prompt_tokens_computed": prompt - cached,
    }
    row |= {"prefill_hit_rate": hit_rate(d, roles, "prefill"),
            "decode_hit_rate": hit_rate(d, roles, "decode")}  # fmt: skip
    row |= {k: total(d, name) for k, name in COUNTERS.items()}
    paths = ("handed_off", "local", "colocated")
    row["placements"] = {p: total(d, "baton:requests_placed_total", path=p) for p in paths}
    if later is not None:
        n = sum(1 for r in ok if r.turn > 0)
        row["later_turns"] = n
        for k in ("kv_bytes", "kv_skipped_bytes"):
            row[f"{k}_per_later_turn"] = total(later, COUNTERS[k]) / max(n, 1)
        stats = multi_turn.turn_stats(results)
        row["median_ttft_ms_after_first_turn"] = stats["median_ttft_ms_after_first_turn"]
        row["per_turn"] = [{k: t[k] for k in ("turn", "median_ttft_ms", "prompt_tokens",
                            "cached_tokens")} for t in stats["per_turn"]]  # fmt: skip
    return row


def find_row(rows: list[dict], workload: str, policy: str, local: int) -> dict | None:
    key = (workload, policy, local)
    return next((r for r in rows if tuple(r[k] for k in KEY) == key), None)


def check_targets(rows: list[dict]) -> list[dict]:
    """kv against load, for each local-prefill setting both ran with. A ratio is load's value
    over kv's; a cut is 1 - kv's value / load's."""
    checks = []
    for local in sorted({r["max_local_prefill_tokens"] for r in rows}):
        for name, workload, key, how, op, target in TARGETS:
            load, kv = (
                find_row(rows, workload, "load", local),
                find_row(rows, workload, "kv", local),
            )
            if load is None or kv is None:
                continue
            a, b = load[key], kv[key]
            value = (a / b if b else None) if how == "ratio" else (1 - b / a if a else None)
            met = None if value is None else value >= target if op == ">=" else value <= target
            checks.append({"max_local_prefill_tokens": local, "name": name, "value": value,
                           "op": op, "target": target, "met": met})  # fmt: skip
    return checks


def format_rows(rows: list[dict]) -> str:
    head = (
        f"{'workload':<19} {'policy':<11} {'local':>5} {'TTFT p50':>8} {'p90':>7} "
        f"{'hit P/D %':>10} {'computed':>8} {'KV MiB/turn>1 (skip)':>20} "
        f"{'placed h/l/c':>12} {'tok/s':>6}"
    )
    lines = [head, "-" * len(head)]
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}"  # noqa: E731
    for r in rows:
        kv = "-"
        if "kv_bytes_per_later_turn" in r:
            moved, skipped = r["kv_bytes_per_later_turn"], r["kv_skipped_bytes_per_later_turn"]
            kv = f"{moved / 2**20:.2f} ({skipped / 2**20:.2f})"
        pl = r["placements"]
        placed = f"{pl['handed_off']:.0f}/{pl['local']:.0f}/{pl['colocated']:.0f}"
        lines.append(
            f"{r['workload']:<19} {r['policy']:<11} {r['max_local_prefill_tokens']:>5} "
            f"{r['median_ttft_ms']:>8.0f} {r['p90_ttft_ms']:>7.0f} "
            f"{pct(r['prefill_hit_rate']) + '/' + pct(r['decode_hit_rate']):>10} "
            f"{r['prompt_tokens_computed']:>8} {kv:>20} {placed:>12} "
            f"{r['output_throughput']:>6.1f}" + (f"  ({r['failed']} failed)" if r["failed"] else "")
        )
    return "\n".join(lines)


def format_checks(checks: list[dict]) -> str:
    lines = []
    for c in checks:
        v = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        verdict = {True: "met", False: "MISSED", None: "n/a"}[c["met"]]
        lines.append(
            f"local {c['max_local_prefill_tokens']:>2}: {c['name']}: {v} "
            f"(target {c['op']} {c['target']}) {verdict}"
        )
    return "\n".join(lines)
