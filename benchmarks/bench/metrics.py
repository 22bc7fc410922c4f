"""Per-request timings and the summary metrics, with vLLM's definitions and key names.

- TTFT: send to the first chunk that carries content.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request with more than one output token.
- ITL: every gap between consecutive content chunks, all requests pooled.
- E2E latency (e2el): send to the last byte.
- goodput: requests per second that met every given SLO (ms), over the whole run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    success: bool
    prompt_len: int  # prompt tokens (the server's usage when it reports one)
    output_len: int  # generated tokens (likewise)
    start: float  # seconds from the run's start to sending the request
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""
    text: str = ""  # what the stream carried (content or text), in order
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens, when reported

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    out: dict[str, float] = {}
    for spec in specs or []:
        name, _, value = spec.partition(":")
        if name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"goodput: unknown metric {name!r} (choose ttft, tpot or e2el)")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput: {spec!r} is not NAME:MILLISECONDS") from None
        if ms <= 0:
            raise ValueError(f"goodput: the SLO of {name} must be positive, got {ms}")
        out[name] = ms
    return out


def _is_good(r: RequestResult, slo: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot if r.tpot is not None else 0.0, "e2el": r.latency}
    return all(values[k] * 1e3 <= ms for k, ms in slo.items())


def _stats(name: str, seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        ms = np.zeros(1)
    out = {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(ms.std()),
    }
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def compute_metrics(
    results: list[RequestResult], duration: float, goodput: dict[str, float] | None = None
) -> dict:
    """The summary of one run that lasted `duration` seconds."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    summary: dict = {
        "completed": len(ok),
        "failed": len(failed),
        "error_counts": dict(Counter(r.error for r in failed)),
        "duration": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    if goodput:
        good = sum(_is_good(r, goodput) for r in ok)
        summary["goodput_slo_ms"] = dict(goodput)
        summary["request_goodput"] = good / duration
    summary.update(_stats("ttft", [r.ttft for r in ok]))
    summary.update(_stats("tpot", [t for r in ok if (t := r.tpot) is not None]))
    summary.update(_stats("itl", [g for r in ok for g in r.itl]))
    summary.update(_stats("e2el", [r.latency for r in ok]))
    return summary


def per_request(results: list[RequestResult]) -> dict[str, list]:
    """The per-request arrays saved beside the summary (failed requests included)."""
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_len for r in results],
        "start_times": [r.start for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "e2els": [r.latency for r in results],
        "errors": [r.error for r in results],
    }


def format_table(m: dict, title: str = "Serving Benchmark Result") -> str:
    rows = [
        ("Successful requests", m["completed"], "d"),
        ("Failed requests", m["failed"], "d"),
        ("Benchmark duration (s)", m["duration"], ".2f"),
        ("Total input tokens", m["total_input_tokens"], "d"),
        ("Total generated tokens", m["total_output_tokens"], "d"),
        ("Request throughput (req/s)", m["request_throughput"], ".2f"),
        ("Output token throughput (tok/s)", m["output_throughput"], ".2f"),
        ("Total token throughput (tok/s)", m["total_token_throughput"], ".2f"),
    ]
    if "request_goodput" in m:
        rows.append(("Request goodput (req/s)", m["request_goodput"], ".2f"))
    lines = [f"{f' {title} ':=^60}"]
    lines += [f"{name:<44}{value:>16{fmt}}" for name, value, fmt in rows]
    heads = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)"}
    heads |= {"itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name in METRICS:
        lines.append(f"{f' {heads[name]} ':-^60}")
        up = name.upper()
        lines.append(f"{f'Mean {up} (ms)':<44}{m[f'mean_{name}_ms']:>16.2f}")
        lines.append(f"{f'Median {up} (ms)':<44}{m[f'median_{name}_ms']:>16.2f}")
        for p in PERCENTILES[1:]:
            lines.append(f"{f'P{p} {up} (ms)':<44}{m[f'p{p}_{name}_ms']:>16.2f}")
    lines.append("=" * 60)
    for err, n in m["error_counts"].items():
        lines.append(f"failed x{n}: {err[:200]}")
    return "\n".join(lines)
