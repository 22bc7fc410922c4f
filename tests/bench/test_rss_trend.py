"""RSS growth per 1000 requests: the slope after warm-up, not the jump before it."""

from __future__ import annotations

import random

from baton.bench.rss_trend import growth_per_1000, plot_rss, slope_per_1000


def test_a_steady_leak_is_its_slope_and_warm_up_is_left_out():
    rng = random.Random(0)
    samples = []
    for done in range(0, 10_001, 50):
        warm = min(done, 1000) * 0.3  # +300 MiB while pages and caches fill, then flat
        samples.append(
            {
                "done": done,
                "flat": 1000 + warm + rng.uniform(-2, 2),
                "leaky": 1000 + warm + 0.004 * done + rng.uniform(-2, 2),  # 4 MiB per 1000
            }
        )
    g = growth_per_1000(samples, 1000, ["flat", "leaky", "missing"])
    assert abs(g["flat"]) < 0.3
    assert 3.7 < g["leaky"] < 4.3
    assert "missing" not in g
    # counted from the start, warm-up would look like a leak (~9 MiB per 1000)
    assert growth_per_1000(samples, 0, ["flat"])["flat"] > 5


def test_too_few_points_give_no_slope():
    assert slope_per_1000([]) is None
    assert slope_per_1000([(5, 1.0), (5, 2.0)]) is None
    assert slope_per_1000([(0, 1.0), (1000, 3.0)]) == 2.0


def test_the_plot_is_written(tmp_path):
    samples = [{"done": d, "router": 400.0, "p0": 1000 + d / 100} for d in range(0, 2000, 100)]
    out = plot_rss(samples, [500, 1500], 1000, ["router", "p0"], tmp_path / "rss.png")
    assert out.stat().st_size > 10_000
