"""kv_transfer's "ttft" section: the time to first (and second) token a handoff adds, through
`baton serve` in both modes."""

from __future__ import annotations

import json
import random
import statistics
import time

from common import served


def token_marks(client, url: str, model: str, prompt: list[int], n: int) -> tuple[list, float]:
    """One streamed greedy completion of exactly `n` tokens: the seconds at which each token
    event arrived, and the seconds to the end of the stream (client-side)."""
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
    body |= {"ignore_eos": True, "stream": True}
    marks = []
    t0 = time.perf_counter()
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if json.loads(line[6:])["choices"]:
                marks.append(time.perf_counter() - t0)
    if len(marks) != n:
        raise RuntimeError(f"expected {n} streamed tokens, one per event, got {len(marks)}")
    return marks, time.perf_counter() - t0


def stream_times(client, url: str, model: str, prompt: list[int]) -> tuple[float, float]:
    """(seconds to the first token, seconds to the second) of one streamed completion."""
    marks, _ = token_marks(client, url, model, prompt, 3)
    return marks[0], marks[1]


def ttft_section(args) -> dict:
    import httpx  # only this section talks HTTP

    rng = random.Random(0)
    rows = {n: {"prompt_tokens": n} for n in args.prompt_lens}
    for mode in ("colocated", "disagg"):
        with served(args, mode) as url, httpx.Client(timeout=600) as client:
            model = client.get(url + "/v1/models").json()["data"][0]["id"]

            def prompt(n: int) -> list[int]:
                return [rng.randrange(1000, 30000) for _ in range(n)]

            stream_times(client, url, model, prompt(64))  # warm-up, untimed
            for n in args.prompt_lens:
                stream_times(client, url, model, prompt(n))  # this length's first, untimed
                got = [stream_times(client, url, model, prompt(n)) for _ in range(args.repeats)]
                first, second = [g[0] for g in got], [g[1] for g in got]
                rows[n][mode] = {
                    "ttft_median_s": statistics.median(first),
                    "second_token_median_s": statistics.median(second),
                    "ttft_s": first,
                    "second_token_s": second,
                }
                print(
                    f"{mode:>9} {n:>5} tokens: TTFT {rows[n][mode]['ttft_median_s'] * 1e3:.1f} ms"
                )
    for row in rows.values():
        c, d = row["colocated"], row["disagg"]
        row["added_ttft_s"] = d["ttft_median_s"] - c["ttft_median_s"]
        row["added_second_token_s"] = d["second_token_median_s"] - c["second_token_median_s"]
    print("\nDisagg vs colocated, median of repeats, ms")
    cols = ("TTFT coloc", "TTFT disagg", "added", "2nd coloc", "2nd disagg", "added")
    print(f"{'prompt':>7}" + "".join(f" {c:>12}" for c in cols))
    for r in rows.values():
        c, d = r["colocated"], r["disagg"]
        ms = [
            c["ttft_median_s"],
            d["ttft_median_s"],
            r["added_ttft_s"],
            c["second_token_median_s"],
            d["second_token_median_s"],
            r["added_second_token_s"],
        ]
        print(f"{r['prompt_tokens']:>7}" + "".join(f" {x * 1e3:>12.1f}" for x in ms))
    return {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "rows": list(rows.values()),
    }
