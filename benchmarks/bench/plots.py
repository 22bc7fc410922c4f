"""PNG plots of a sweep: throughput, TTFT and TPOT percentiles, goodput vs the swept value, and
the TTFT CDF of each run."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot drawing to files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(runs: list[dict], axis: str, out_dir: Path) -> list[Path]:
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    xs = [r["sweep_value"] for r in runs]
    label = axis.replace("_", " ")
    paths = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["output_throughput"] for r in runs], "o-", label="output tok/s")
    ax.plot(xs, [r["total_token_throughput"] for r in runs], "s--", label="total tok/s")
    ax.set(xlabel=label, ylabel="tokens / s", title="Throughput")
    ax.legend()
    save(fig, "throughput.png")

    for metric in ("ttft", "tpot"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in ("median", "p90", "p99"):
            ax.plot(xs, [r[f"{p}_{metric}_ms"] for r in runs], "o-", label=p)
        ax.set(xlabel=label, ylabel="ms", title=metric.upper())
        ax.legend()
        save(fig, f"{metric}.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ttfts = np.sort([t * 1e3 for t, e in zip(r["ttfts"], r["errors"], strict=True) if not e])
        if ttfts.size:
            ax.step(ttfts, np.arange(1, ttfts.size + 1) / ttfts.size, label=f"{r['sweep_value']}")
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title=f"TTFT CDF by {label}")
    ax.legend(title=label)
    save(fig, "ttft_cdf.png")

    if all("request_goodput" in r for r in runs):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, [r["request_goodput"] for r in runs], "o-", label="goodput")
        ax.plot(xs, [r["request_throughput"] for r in runs], "s--", label="throughput")
        ax.set(xlabel=label, ylabel="requests / s", title="Goodput")
        ax.legend()
        save(fig, "goodput.png")
    return paths
