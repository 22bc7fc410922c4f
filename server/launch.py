"""`baton serve`, `baton router` and `baton worker`: start the parts, alone or all together."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys

from baton.server.flags import (
    ENGINE_FLAGS,
    FORWARDED,
    MODEL_FLAGS,
    SECURITY_FLAGS,
    WORKER_FLAGS,
    add_flags,
    engine_fields,
    forward,
)
from baton.server.router.args import add_router_args, curve_keys, serve_config

logger = logging.getLogger("baton")


def _thread_config(args):
    from baton.server.cpu_threads import ThreadConfig
    from baton.server.host_cpu import parse_cpu_list

    cpus = None if args.cpus is None else parse_cpu_list(args.cpus)
    return ThreadConfig(threads=args.threads, wait_policy=args.thread_wait_policy, cpus=cpus)


def _engine_config(args, num_on_device: int = 1):
    from baton.server.config import EngineConfig

    fields = engine_fields(args)
    if fields["gpu_memory_utilization"] is None:
        fields["gpu_memory_utilization"] = round(0.85 / max(1, num_on_device), 3)
    return EngineConfig(**fields, show_progress=False, detokenize=False)


def run_worker(args) -> int:
    from baton.server.cpu_threads import apply_thread_plan, plan_threads

    # NOTE: before anything loads torch: OpenMP reads its waiting policy once, when it loads.
    try:
        threads = plan_threads(_thread_config(args))
    except ValueError as e:
        print(f"baton worker: {e}", file=sys.stderr)
        return 2
    apply_thread_plan(threads)

    from baton.server.worker.config import WorkerConfig
    from baton.server.worker.registration import RegistrationError
    from baton.server.worker.worker import Worker

    kw = {"worker_id": args.worker_id} if args.worker_id else {}
    cfg = WorkerConfig(
        role=args.role,
        router=args.router,
        engine=_engine_config(args, args.workers_on_device),
        kv_host=args.kv_host,
        kv_port=args.kv_port,
        parent_pid=args.parent_pid,
        drain_timeout_s=args.drain_timeout,
        kv_timeout_s=args.kv_timeout,
        register_timeout_s=args.register_timeout,
        health_host=args.health_host,
        health_port=args.health_port,
        curve=curve_keys(args),
        threads=threads,
        **kw,
    )
    try:
        worker = Worker(cfg)
    except ValueError as e:  # a flag the engine refused (model, dtype, cpu_linear ...)
        print(f"baton worker: {e}", file=sys.stderr)
        return 2
    # SIGTERM drains (finish or give back the work, deregister, exit); Ctrl-C stops at once.
    signal.signal(signal.SIGTERM, lambda *_: worker.drain())
    with contextlib.suppress(KeyboardInterrupt):
        try:
            worker.run()
        except RegistrationError as e:  # refused (another protocol version, a mismatch) or unheard
            print(f"baton worker: {e}", file=sys.stderr)
            return 1
    return 0


def run_router(args) -> int:
    from baton.server.router.main import build_cluster, run_router

    try:
        cfg = serve_config(args, args.control)
    except ValueError as e:  # a key file that cannot be read, a flag out of range
        print(f"baton router: {e}", file=sys.stderr)
        return 2
    cluster = build_cluster(cfg)
    print(f"router: workers connect to {cluster.endpoint}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_router(cfg, cluster, ready=lambda _s: _announce(cfg)))
    return 0


def _announce(cfg) -> None:
    print(f"Baton listening on http://{cfg.host}:{cfg.port}/v1", flush=True)


def worker_command(
    args, role: str, router: str, index: int, num_workers: int, cpus: str | None = None
) -> list[str]:
    """The `baton worker` command line `baton serve` starts; `cpus`: its cores (else --cpus)."""
    cmd = [sys.executable, "-m", "baton.server.cli", "worker", "--role", role, "--router", router]
    cmd += ["--worker-id", f"{role}-{index}-{os.getpid()}", "--parent-pid", str(os.getpid())]
    cmd += ["--workers-on-device", str(num_workers)]
    return cmd + forward(FORWARDED, vars(args) | ({"cpus": cpus} if cpus else {}))


def run_serve(args) -> int:
    """Router in this process, workers as child processes; the URL is printed once ready."""
    from baton.server.router.main import build_cluster, run_router

    n = args.workers if args.mode == "colocated" else args.prefill_workers + args.decode_workers
    try:
        cfg = serve_config(args, "tcp://127.0.0.1:0")
        _check_host_kv(args, n)
    except ValueError as e:
        print(f"baton serve: {e}", file=sys.stderr)
        return 2
    # NOTE: uvicorn re-raises the SIGTERM it caught once it has shut down; without a handler of
    # ours that would kill this process before the `finally` below stops the workers.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    cluster = build_cluster(cfg)
    print(f"router: workers connect to {cluster.endpoint}", flush=True)
    if args.mode == "colocated":
        roles = ["both"] * args.workers
    else:
        roles = ["prefill"] * args.prefill_workers + ["decode"] * args.decode_workers
    cpus = _worker_cpus(args, roles)
    procs = [
        subprocess.Popen(worker_command(args, r, cluster.endpoint, i, len(roles), cpus[i]))
        for i, r in enumerate(roles)
    ]

    async def main() -> int:
        ready = asyncio.Event()
        serving = asyncio.create_task(run_router(cfg, cluster, ready=lambda _s: ready.set()))
        await ready.wait()
        while not cluster.health()[0]:
            dead = [p for p in procs if p.poll() is not None]
            if dead or serving.done():
                logger.error("a worker exited before the server was ready")
                serving.cancel()
                return 1
            await asyncio.sleep(0.1)
        _announce(cfg)
        while not serving.done():
            await asyncio.sleep(0.5)
        return 0

    try:
        return asyncio.run(main())
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM through _exit_on_signal
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # stop now: the router (and its clients) are gone
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def _check_host_kv(args, num_workers: int) -> None:
    """The workers' host KV caches together must fit what this host leaves: each worker checks
    its own at start, but they start at once and every check would see the others' unspent.
    NOTE: a rough bound (weights and activations come on top); the workers check precisely."""
    from baton.server.config import EngineConfig
    from baton.server.host_memory import check_fits

    if args.device == "cuda" or (args.device is None and os.path.exists("/dev/nvidiactl")):
        return
    gib = args.kv_cache_gib if args.kv_cache_gib is not None else EngineConfig.kv_cache_gib
    check_fits(
        int(num_workers * gib * 2**30), 0, f"--kv-cache-gib ({num_workers} workers x {gib:g})"
    )


def _worker_cpus(args, roles: list[str]) -> list[str | None]:
    """Each worker's cores: all of them, shared (--worker-cores shared), or a disjoint set."""
    from baton.server.cpu_threads import split_cpus
    from baton.server.host_cpu import format_cpu_list, parse_cpu_list, usable_cpus

    if args.worker_cores == "shared" or (args.device or "cpu") != "cpu":
        how = "every worker on every core" if args.cpus is None else f"cores {args.cpus}"
        logger.info("CPU: %s, shared by %d workers", how, len(roles))
        return [None] * len(roles)
    given = usable_cpus() if args.cpus is None else parse_cpu_list(args.cpus)
    sets = [format_cpu_list(s) for s in split_cpus(given, roles)]
    logger.info("CPU: cores split among the workers: %s", list(zip(roles, sets, strict=True)))
    return sets


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def add_subcommands(sub) -> None:
    serve = sub.add_parser("serve", help="router + prefill and decode pools on this machine")
    add_flags(serve, MODEL_FLAGS + ENGINE_FLAGS)
    add_router_args(serve)
    add_flags(serve, SECURITY_FLAGS)
    serve.add_argument("--prefill-workers", type=int, default=1)
    serve.add_argument("--decode-workers", type=int, default=1)
    serve.add_argument("--workers", type=int, default=1, help="colocated mode: pool size")
    add_flags(serve, WORKER_FLAGS)
    serve.add_argument(
        "--worker-cores",
        default="shared",
        choices=["shared", "split"],
        help="CPU: every worker on every core (shared), or each pinned to its own cores (split)",
    )
    serve.set_defaults(func=run_serve)

    router = sub.add_parser("router", help="the HTTP router alone; workers join it")
    add_flags(router, MODEL_FLAGS)
    add_router_args(router)
    add_flags(router, SECURITY_FLAGS)
    router.add_argument(
        "--control",
        default="tcp://127.0.0.1:8001",
        help="where workers connect (loopback by default: give an address to reach other hosts)",
    )
    router.set_defaults(func=run_router)

    worker = sub.add_parser("worker", help="one prefill, decode or colocated worker")
    add_flags(worker, MODEL_FLAGS + ENGINE_FLAGS + SECURITY_FLAGS)
    worker.add_argument("--role", required=True, choices=["prefill", "decode", "both"])
    worker.add_argument("--router", required=True, help="e.g. tcp://ROUTER_HOST:8001")
    worker.add_argument("--kv-host", default="127.0.0.1", help="address peers reach this on")
    worker.add_argument("--kv-port", type=int, default=0)
    worker.add_argument(
        "--register-timeout", type=float, default=60.0, help="seconds to wait for the router"
    )
    worker.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="serve HTTP probes here: /health (ready: registered, not draining), /live",
    )
    worker.add_argument("--health-host", default="127.0.0.1", help="where the probes listen")
    worker.add_argument("--worker-id", default=None)
    add_flags(worker, WORKER_FLAGS)
    worker.add_argument("--workers-on-device", type=int, default=1, help=argparse.SUPPRESS)
    worker.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    worker.set_defaults(func=run_worker)
