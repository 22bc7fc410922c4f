"""How a process's RSS grows with the requests served, from (requests done, MiB) samples.

The figure is the least-squares slope of RSS against requests done, over the samples taken
after warm-up, in MiB per 1000 requests: a leak grows with the work done, whatever the pace,
while a cache filling up (or a burst of allocator noise) flattens out and weighs little on a
slope fitted over thousands of requests."""

from __future__ import annotations

from pathlib import Path


def slope_per_1000(points: list[tuple[float, float]]) -> float | None:
    """MiB per 1000 requests fitted to (done, MiB) points; None under two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return 1000.0 * sxy / sxx


def growth_per_1000(samples: list[dict], warm_up: int, names: list[str]) -> dict[str, float]:
    """Per name, the slope over the samples with at least `warm_up` requests done."""
    out = {}
    for name in names:
        pts = [(s["done"], s[name]) for s in samples if s["done"] >= warm_up and name in s]
        slope = slope_per_1000(pts)
        if slope is not None:
            out[name] = slope
    return out


def plot_rss(samples: list[dict], kills: list[int], warm_up: int, names: list[str], path: Path):
    """RSS of each process against requests done, kills and the end of warm-up marked."""
    from baton.bench.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.6 * len(names)), sharex=True)
    for ax, name in zip(axes if len(names) > 1 else [axes], names, strict=True):
        pts = [(s["done"], s[name]) for s in samples if name in s]
        ax.plot([x for x, _ in pts], [y for _, y in pts], lw=1.2)
        for k in kills:
            ax.axvline(k, color="grey", lw=0.5, alpha=0.5)
        ax.axvline(warm_up, color="C3", lw=1, ls="--")
        ax.set_ylabel(f"{name} RSS (MiB)")
    (axes[-1] if len(names) > 1 else axes).set_xlabel(
        "requests done (grey: a worker killed and replaced; red dashed: end of warm-up)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
