"""How cost grows: TTFT and KV handoff time vs prompt length, and the router's overhead per request.

Section "handoff": `baton serve` once per mode (colocated, then disagg with one prefill and one
decode worker); each prompt length is sent as fresh random token ids (no prefix-cache hit), one
request at a time, through the streaming completions endpoint. The client times the first token;
in disagg mode the server's own `baton:kv_transfer_duration_seconds` and `baton:kv_transfer_bytes`
are read from /metrics before and after each request, so each handoff's time and size are those
of that request alone (first KV chunk sent to the decode worker's acknowledgement).

Section "overhead": the same requests (token-id prompts, greedy, fixed output lengths) first
through the offline engine in this process, then through `baton serve` in each mode, one at a
time. What the server adds (HTTP, JSON and SSE, the router, the ZeroMQ hops, detokenising on the
router and, in disagg mode, the handoff) is served E2E minus offline E2E. Two output lengths
split it into a per-request part and a per-token part (a line through the two medians).

Section "plot": one PNG from this run and, when present, the concurrency sweep saved by
`compare_serving.py` (output tok/s vs concurrency).

    python benchmarks/cost_growth.py                                   # CPU, smollm2
    python benchmarks/cost_growth.py --sections overhead --repeats 5
    python benchmarks/cost_growth.py --device cuda --dtype bfloat16 --model path/to/llama3-dummy
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from pathlib import Path

import httpx
from bench.kv_ttft import token_marks
from common import RESULTS_DIR, save_result, served

from baton.bench.plots import pyplot

KV_SECONDS = "baton:kv_transfer_duration_seconds_sum"
KV_COUNT = "baton:kv_transfer_duration_seconds_count"
KV_BYTES = "baton:kv_transfer_bytes_total"


def scrape(client: httpx.Client, url: str, names: tuple[str, ...]) -> dict[str, float]:
    """Unlabelled samples of the router's /metrics page."""
    found = {}
    for line in client.get(url + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[name] = float(value)
    missing = set(names) - set(found)
    if missing:
        raise RuntimeError(f"/metrics lacks {sorted(missing)}")
    return found


def stream(client: httpx.Client, url: str, model: str, prompt: list[int], n: int) -> dict:
    """One streamed greedy completion of exactly `n` tokens: client-side TTFT and E2E."""
    marks, e2e = token_marks(client, url, model, prompt, n)
    return {"ttft_s": marks[0], "e2e_s": e2e}


def model_id(client: httpx.Client, url: str) -> str:
    return client.get(url + "/v1/models").json()["data"][0]["id"]


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 30000) for _ in range(n)]


def handoff_section(args) -> dict:
    rng = random.Random(0)
    rows = {n: {"prompt_tokens": n} for n in args.prompt_lens}
    for mode in ("colocated", "disagg"):
        with served(args, mode) as url, httpx.Client(timeout=900) as client:
            model = model_id(client, url)
            stream(client, url, model, random_prompt(rng, 64), 2)  # warm-up, untimed
            for n in args.prompt_lens:
                stream(client, url, model, random_prompt(rng, n), 2)  # untimed
                ttft, kv_s, kv_bytes = [], [], []
                for _ in range(args.repeats):
                    before = scrape(client, url, (KV_SECONDS, KV_COUNT, KV_BYTES))
                    ttft.append(stream(client, url, model, random_prompt(rng, n), 2)["ttft_s"])
                    after = scrape(client, url, (KV_SECONDS, KV_COUNT, KV_BYTES))
                    handoffs = after[KV_COUNT] - before[KV_COUNT]
                    if handoffs != (1 if mode == "disagg" else 0):
                        raise RuntimeError(f"{mode}: {handoffs} handoffs for one request")
                    kv_s.append(after[KV_SECONDS] - before[KV_SECONDS])
                    kv_bytes.append(after[KV_BYTES] - before[KV_BYTES])
                row = {"ttft_median_s": statistics.median(ttft), "ttft_s": ttft}
                if mode == "disagg":
                    row |= {"handoff_median_s": statistics.median(kv_s), "handoff_s": kv_s}
                    row["handoff_bytes"] = statistics.median(kv_bytes)
                rows[n][mode] = row
                extra = ""
                if mode == "disagg":
                    extra = (
                        f", handoff {row['handoff_median_s'] * 1e3:.1f} ms for "
                        f"{row['handoff_bytes'] / 2**20:.1f} MiB"
                    )
                print(f"{mode:>9} {n:>5} tokens: TTFT {row['ttft_median_s'] * 1e3:.1f} ms{extra}")
    return {"rows": list(rows.values())}


def offline_times(args, prompts: list[list[int]], n: int) -> list[float]:
    from baton import LLM, SamplingParams

    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, show_progress=False)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    llm.generate([prompts[0]], params)  # warm-up, untimed
    times = []
    for p in prompts[1:]:
        t0 = time.perf_counter()
        (out,) = llm.generate([p], params)
        times.append(time.perf_counter() - t0)
        assert len(out.token_ids) == n
    del llm
    gc.collect()
    return times


def fit(per_len: dict[int, float]) -> tuple[float, float]:
    """(per-request seconds, per-token seconds) of the line through two (length, added) points."""
    (n1, a1), (n2, a2) = sorted(per_len.items())
    slope = (a2 - a1) / (n2 - n1)
    return a1 - slope * n1, slope


def overhead_section(args) -> dict:
    rng = random.Random(1)
    lens = args.output_lens
    prompts = [random_prompt(rng, args.overhead_prompt_len) for _ in range(args.repeats + 1)]
    e2e = {"offline": {n: offline_times(args, prompts, n) for n in lens}}
    for mode in ("colocated", "disagg"):
        with served(args, mode) as url, httpx.Client(timeout=900) as client:
            model = model_id(client, url)
            e2e[mode] = {}
            for n in lens:
                stream(client, url, model, prompts[0], n)  # warm-up, untimed
                # NOTE: the same prompts as offline: a prefix-cache hit after the first is the
                # same on both paths, and each length's first request is the untimed one.
                e2e[mode][n] = [stream(client, url, model, p, n)["e2e_s"] for p in prompts[1:]]
    med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in e2e.items()}
    result = {"prompt_tokens": args.overhead_prompt_len, "e2e_s": e2e, "median_e2e_s": med}
    for mode in ("colocated", "disagg"):
        added = {n: med[mode][n] - med["offline"][n] for n in lens}
        per_request, per_token = fit(added)
        result[mode] = {
            "added_median_s": added,
            "per_request_s": per_request,
            "per_token_s": per_token,
        }
        cells = ", ".join(
            f"{n} tokens: {med['offline'][n] * 1e3:.0f} -> {med[mode][n] * 1e3:.0f} ms"
            for n in lens
        )
        print(
            f"{mode:>9}: {cells}; added {per_request * 1e3:.1f} ms per request + "
            f"{per_token * 1e3:.2f} ms per token"
        )
    return result


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    sweep = RESULTS_DIR / f"compare_serving_{results['args']['device']}.json"
    panels = [k for k in ("handoff", "overhead") if k in results]
    panels += ["sweep"] if sweep.exists() else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "sweep":
            rows = json.loads(sweep.read_text())["rows"]
            for system, style in (("disagg", "o-"), ("colocated", "s-"), ("transformers", "^--")):
                pts = [
                    (r["concurrency"], r["output_throughput"])
                    for r in rows
                    if r["system"] == system
                ]
                ax.plot(*zip(*pts, strict=True), style, label=system)
            ax.set(xscale="log", xlabel="concurrency", ylabel="output tokens / s")
            ax.set_title("Output throughput vs concurrency")
        elif panel == "handoff":
            rows = results["handoff"]["rows"]
            n = [r["prompt_tokens"] for r in rows]
            ax.plot(
                n,
                [r["colocated"]["ttft_median_s"] * 1e3 for r in rows],
                "s-",
                label="TTFT colocated",
            )
            ax.plot(
                n, [r["disagg"]["ttft_median_s"] * 1e3 for r in rows], "o-", label="TTFT disagg"
            )
            ax.plot(
                n,
                [r["disagg"]["handoff_median_s"] * 1e3 for r in rows],
                "d--",
                label="KV handoff (disagg)",
            )
            ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms")
            ax.set_xticks(n, labels=[str(x) for x in n])
            ax.xaxis.set_minor_locator(plt.NullLocator())
            ax.set_title("TTFT and KV handoff vs prompt length")
        else:
            o = results["overhead"]
            modes = ("colocated", "disagg")
            lens = sorted(o[modes[0]]["added_median_s"], key=int)
            width = 0.8 / len(lens)
            for j, n in enumerate(lens):
                ax.bar(
                    [i - 0.4 + width * (j + 0.5) for i in range(len(modes))],
                    [o[m]["added_median_s"][n] * 1e3 for m in modes],
                    width,
                    label=f"{n} output tokens",
                )
            ax.set_xticks(range(len(modes)), labels=modes)
            ax.set(ylabel="ms added per request (median)")
            ax.set_title("Served E2E minus offline E2E")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SECTIONS = {"handoff": handoff_section, "overhead": overhead_section}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--prompt-lens", nargs="+", type=int, default=[128, 512, 1024, 2048, 4096])
    p.add_argument("--output-lens", nargs=2, type=int, default=[8, 64], help="overhead section")
    p.add_argument("--overhead-prompt-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed requests per point (median)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--output", default=None, help="default: results/cost_growth_<device>.json")
    args = p.parse_args()
    results = {"args": vars(args)}
    for name in args.sections:
        results[name] = SECTIONS[name](args)
    out = save_result(f"cost_growth_{args.device}", results, args.output)
    png = out.with_suffix(".png")
    plot(results, png)
    print(f"saved {out} and {png}")


if __name__ == "__main__":
    main()
