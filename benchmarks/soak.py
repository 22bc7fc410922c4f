"""A bounded soak: thousands of requests while clients disconnect, abort, and workers are killed.

A router, prefill and decode workers run as separate processes on loopback (smollm2 on CPU by
default). Clients send short streamed and non-streamed completions at a fixed concurrency; some
disconnect after a few chunks, some give up (client timeout) before the answer. Every
`--kill-every` seconds a worker is killed with SIGKILL (prefill and decode in turn) and a fresh
one started in its place. At the end, with no load left:

- every request is accounted for: completed, failed with an error the server sent (by kind), or
  cut off by its own client on purpose; none hangs (each has a hard client timeout);
- every live worker's KV usage is back to zero (leaked blocks must be 0), nothing is running,
  waiting or assigned;
- the RSS of the router and of the worker of each pool that is never killed (p0, d0), sampled
  every few seconds: its growth per 1000 requests after warm-up (the least-squares slope, see
  baton.bench.rss_trend) must stay under --max-growth for each, or the run fails; unless
  all it grew after warm-up is under --growth-floor MiB.

Why 2 MiB per 1000 requests: steady state holds no per-request memory (the KV cache is written
at start, compiled grammars are an LRU of 64, the router forgets finished requests and dead
workers), so the slope of a healthy process is allocator noise, well under 1 MiB per 1000 over
thousands of requests. A leak of one 2 KiB object per request (a dict of a request's state, a
prompt's token list) already crosses it; at 10 requests/s that is 72 MiB an hour, what an
operator would restart a worker for. The floor: an allocator takes memory in steps (a new
arena, a batch shape first seen), a few MiB at a time; over a short run one step reads as a
steep slope, over 10,000 requests it is noise, and a real leak crosses 8 MiB within a few
thousand requests.

    python benchmarks/soak.py                                   # ~2000 requests, a few minutes
    python benchmarks/soak.py --num-requests 10000 --kill-every 60 --output results/soak_long.json
    python benchmarks/soak.py --num-requests 300 --kill-every 10 --output /tmp/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import signal
import sys
import time
from pathlib import Path

import httpx
from common import save_result

from baton.bench.cluster import Cluster, rss_bytes
from baton.bench.rss_trend import growth_per_1000, plot_rss


class Soak:
    def __init__(self, args, cluster: Cluster) -> None:
        self.args = args
        self.c = cluster
        self.rng = random.Random(args.seed)
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.kills: list[dict] = []
        self.done = 0
        self.rss: list[dict] = []  # (requests done, MiB of each survivor) every few seconds

    def body(self) -> dict:
        rng = self.rng
        prompt = [rng.randrange(1000, 30000) for _ in range(rng.randint(4, self.args.max_prompt))]
        return self.c.body(prompt, rng.randint(1, self.args.max_tokens))

    async def one(self, client: httpx.AsyncClient) -> None:
        rng = self.rng
        body = self.body()
        kind = rng.choices(["stream", "plain", "disconnect", "give_up"], self.args.mix)[0]
        try:
            if kind == "give_up":  # the client stops waiting; the server must clean up
                try:
                    await client.post(
                        self.c.url + "/v1/completions", json=body, timeout=rng.uniform(0.05, 0.5)
                    )
                    self.outcomes["completed"] += 1
                except httpx.TimeoutException:
                    self.outcomes["client_gave_up"] += 1
                return
            if kind == "plain":
                r = await client.post(self.c.url + "/v1/completions", json=body)
                if r.status_code == 200:
                    self.outcomes["completed"] += 1
                else:
                    self._failed(f"HTTP {r.status_code} {r.json()['error'].get('code')}")
                return
            body["stream"] = True
            cut = rng.randint(1, 3) if kind == "disconnect" else None
            async with client.stream("POST", self.c.url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    self._failed(f"HTTP {r.status_code} {r.json()['error'].get('code')}")
                    return
                chunks = 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        self._failed(f"stream error {event['error'].get('code')}")
                        return
                    chunks += 1
                    if cut is not None and chunks >= cut:
                        self.outcomes["client_disconnected"] += 1
                        return  # leaving the block closes the connection mid-stream
            self.outcomes["completed"] += 1
        except httpx.TimeoutException:
            self.outcomes["hung"] += 1  # the server never finished within the hard timeout
        except httpx.HTTPError as e:
            self._failed(f"transport {type(e).__name__}")
        finally:
            self.done += 1

    def _failed(self, why: str) -> None:
        self.outcomes["failed"] += 1
        self.errors[why] += 1

    async def clients(self) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(self.args.num_requests):
            queue.put_nowait(i)
        limits = httpx.Limits(max_connections=self.args.concurrency * 2)
        async with httpx.AsyncClient(timeout=self.args.request_timeout, limits=limits) as client:

            async def worker() -> None:
                while not queue.empty():
                    queue.get_nowait()
                    await self.one(client)

            await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))

    async def killer(self, finished: asyncio.Event) -> None:
        """Kill a prefill then a decode worker, and so on, each replaced at once. The first
        worker of each pool (p0, d0) is never killed: its RSS over the whole soak is measured."""
        roles = ["prefill", "decode"]
        n = 0
        while not finished.is_set():
            try:
                await asyncio.wait_for(finished.wait(), self.args.kill_every)
                return
            except TimeoutError:
                pass
            role = roles[n % 2]
            victim = next(
                name
                for name in sorted(self.c.workers)
                if self._live(name, role) and name != f"{role[0]}0"
            )
            await asyncio.to_thread(self.c.kill, victim)
            n += 1
            fresh = f"{role[0]}{len(self.c.workers)}"
            self.kills.append(
                {"t": time.monotonic(), "done": self.done, "killed": victim, "started": fresh}
            )
            print(f"\nkilled {victim} after {self.done} requests; starting {fresh}", flush=True)
            await asyncio.to_thread(self.c.add_worker, fresh, role, *self.args.worker_args)

    def _live(self, name: str, role: str) -> bool:
        return name.startswith(role[0]) and self.c.workers[name].poll() is None

    async def progress(self, finished: asyncio.Event) -> None:
        while not finished.is_set():
            await asyncio.sleep(5)
            sample = {n: v / 2**20 for n, v in survivors_rss(self.c).items()}
            self.rss.append({"done": self.done, **sample})
            print(f"\r{self.done}/{self.args.num_requests} {dict(self.outcomes)}", end="")
            sys.stdout.flush()

    async def run(self) -> float:
        finished = asyncio.Event()
        t0 = time.monotonic()
        side = [
            asyncio.create_task(self.killer(finished)),
            asyncio.create_task(self.progress(finished)),
        ]
        try:
            await self.clients()
        finally:
            finished.set()
            await asyncio.gather(*side)
        return time.monotonic() - t0


def survivors_rss(c: Cluster) -> dict[str, int]:
    """RSS of the router and of the workers the soak never kills."""
    procs = {"router": c.router, "p0": c.workers["p0"], "d0": c.workers["d0"]}
    return {name: rss_bytes(p.pid) for name, p in procs.items()}


def warm_up(c: Cluster, n: int) -> None:
    rng = random.Random(12345)
    for _ in range(n):
        c.complete([rng.randrange(1000, 30000) for _ in range(16)], 8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=48, help="prompt tokens: 4..this")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens: 1..this")
    p.add_argument(
        "--mix",
        nargs=4,
        type=float,
        default=[0.5, 0.2, 0.2, 0.1],
        metavar=("STREAM", "PLAIN", "DISCONNECT", "GIVE_UP"),
        help="weights of the request kinds",
    )
    p.add_argument("--prefill-workers", type=int, default=2)
    p.add_argument("--decode-workers", type=int, default=2)
    p.add_argument("--kill-every", type=float, default=45.0, help="seconds between worker kills")
    p.add_argument("--request-timeout", type=float, default=120.0, help="a hung request's limit")
    p.add_argument(
        "--warm-up",
        type=int,
        default=None,
        help="requests before RSS growth is counted (default: a fifth, at most 1000)",
    )
    p.add_argument(
        "--max-growth",
        type=float,
        default=2.0,
        help="MiB of RSS per 1000 requests after warm-up past which the run fails",
    )
    p.add_argument(
        "--growth-floor",
        type=float,
        default=8.0,
        help="MiB of RSS growth after warm-up that passes whatever the slope",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="default: results/soak.json")
    p.add_argument("--plot", default=None, help="RSS curve (default: beside --output, .png)")
    args = p.parse_args()
    if args.warm_up is None:
        args.warm_up = min(1000, args.num_requests // 5)
    args.worker_args = ["--kv-cache-gib", "0.25"]

    c = Cluster("disagg", ("--max-num-requests", str(args.concurrency * 4)))
    try:
        for i in range(args.prefill_workers):
            c.add_worker(f"p{i}", "prefill", *args.worker_args)
        for i in range(args.decode_workers):
            c.add_worker(f"d{i}", "decode", *args.worker_args)
        warm_up(c, 8)
        rss_before = survivors_rss(c)
        soak = Soak(args, c)
        seconds = asyncio.run(soak.run())
        print()
        states = c.wait_idle(timeout=60)
        live = {n: s for n, s in states.items() if s["state"] != "dead"}
        leaked = {n: s["num_blocks"] - s["num_free_blocks"] for n, s in live.items()}
        rss_after = survivors_rss(c)
        growth = {n: rss_after[n] - rss_before[n] for n in rss_after}
        # NOTE: RSS first grows as allocator arenas and per-shape caches fill; a leak
        # keeps growing with the requests served, so the second half is the figure to watch.
        before_mib = {n: v / 2**20 for n, v in rss_before.items()}
        half = next((s for s in soak.rss if s["done"] >= args.num_requests // 2), before_mib)
        second_half = {n: rss_after[n] / 2**20 - half[n] for n in rss_after}
        accounted = sum(soak.outcomes.values())
        per_1000 = growth_per_1000(soak.rss, args.warm_up, list(rss_after))
        warm = next((s for s in soak.rss if s["done"] >= args.warm_up), before_mib)
        since_warm = {n: rss_after[n] / 2**20 - warm[n] for n in rss_after}
        too_fast = {
            n: v
            for n, v in per_1000.items()
            if v > args.max_growth and since_warm[n] > args.growth_floor
        }
        result = {
            "args": {k: v for k, v in vars(args).items()},
            "seconds": seconds,
            "requests": args.num_requests,
            "accounted": accounted,
            "outcomes": dict(soak.outcomes),
            "failures_by_kind": dict(soak.errors),
            "kills": len(soak.kills),
            "kill_log": soak.kills,
            "leaked_blocks": leaked,
            "kv_leak_total": sum(leaked.values()),
            "live_workers": sorted(live),
            "rss_before_mib": {n: v / 2**20 for n, v in rss_before.items()},
            "rss_after_mib": {n: v / 2**20 for n, v in rss_after.items()},
            "rss_growth_mib": {n: v / 2**20 for n, v in growth.items()},
            "rss_growth_second_half_mib": second_half,
            "rss_growth_per_1000_after_warm_up_mib": per_1000,
            "rss_growth_after_warm_up_mib": since_warm,
            "rss_growth_bound_per_1000_mib": args.max_growth,
            "rss_growth_over_bound": too_fast,
            "rss_samples_mib": soak.rss,
        }
    finally:
        c.close()
    out = save_result("soak", result, args.output)
    png = Path(args.plot) if args.plot else Path(out).with_suffix(".png")
    kills_at = [k["done"] for k in soak.kills]
    plot_rss(soak.rss, kills_at, args.warm_up, list(rss_after), png)
    print(
        f"{accounted}/{args.num_requests} requests in {seconds:.0f} s: {dict(soak.outcomes)}; "
        f"failures {dict(soak.errors)}; {len(soak.kills)} kills; KV leak "
        f"{result['kv_leak_total']} blocks; RSS growth (MiB) from warm-up "
        + ", ".join(f"{n} {v:+.1f}" for n, v in result["rss_growth_mib"].items())
        + "; over the second half "
        + ", ".join(f"{n} {v:+.1f}" for n, v in second_half.items())
        + f"; per 1000 requests after {args.warm_up} "
        + ", ".join(f"{n} {v:+.2f}" for n, v in per_1000.items())
        + f" (bound {args.max_growth})"
    )
    print(f"saved {out} and {png}")
    if too_fast:
        print(f"RSS grows past {args.max_growth} MiB per 1000 requests: {too_fast}")
    ok = result["kv_leak_total"] == 0 and accounted == args.num_requests
    ok = ok and soak.outcomes.get("hung", 0) == 0 and not too_fast
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
