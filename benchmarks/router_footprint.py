"""The router's footprint: seconds from launch until /health answers, and its RSS at rest.

Starts `baton router` alone (no workers) a few times, polls /health, then reads the process's
resident memory from /proc. Prints and saves JSON (results/router_footprint.json).

    python benchmarks/router_footprint.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

from common import save_result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def once(model: str) -> tuple[float, float]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "baton.server.cli",
        "router",
        "--model",
        model,
        "--port",
        str(port),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the router exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except urllib.error.HTTPError:  # 503 without workers: it answers all the same
                break
            except OSError:
                time.sleep(0.02)
        ready = time.perf_counter() - t0
        time.sleep(2.0)  # at rest
        return ready, rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--save-result", default=None)
    args = ap.parse_args()
    once(args.model)  # the first start may convert a GGUF or fill caches: not measured
    runs = [once(args.model) for _ in range(args.repeats)]
    out = {
        "cpus": os.cpu_count(),
        "startup_s": statistics.median(r[0] for r in runs),
        "rss_mib": statistics.median(r[1] for r in runs),
        "runs": [{"startup_s": round(a, 3), "rss_mib": round(b, 1)} for a, b in runs],
    }
    print(f"router: /health after {out['startup_s']:.2f} s, RSS at rest {out['rss_mib']:.0f} MiB")
    print(f"saved {save_result('router_footprint', out, args.save_result)}")


if __name__ == "__main__":
    main()
