"""A worker's CPU threads: how many, how they wait between parallel regions, on which cores.

Chosen before torch loads its thread pools (OpenMP reads its waiting policy once, at load),
logged, and overridable by flags (`--threads`, `--thread-wait-policy`, `--cpus`).

NOTE: OpenMP's default waiting policy is what made Baton collapse beside another busy process.
A thread that has finished its share of a parallel region spins (GNU OpenMP: 300,000 pause
loops, ~20 ms on a Xeon) before it sleeps. With one unrelated busy process on a 2-core host,
each of a decode step's ~120 parallel regions then waits for the thread that shares its core
with that process, while the finished thread holds the other core spinning: decode steps took
3.7x as long (1 prefill + 1 decode worker, concurrency 1). Sleeping at once (`passive`) let the
OS move the waiting thread onto the freed core (1.1x), but alone every region paid a wake-up
(TPOT 68 ms instead of 52). `brief` spins only as long as the usual gap between two regions of
a step, then sleeps; see benchmarks/shared_cpu.py for the figures.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from baton.server.host_cpu import cpu_quota, format_cpu_list, usable_cpus

logger = logging.getLogger(__name__)

WAIT_POLICIES = ("auto", "brief", "passive", "active")
# GNU OpenMP spin loops before a waiting thread sleeps, per policy (None: spin until work comes).
SPIN_COUNTS = {"brief": 300, "passive": 0, "active": None}
# What each OpenMP runtime reads for it: GNU (the torch wheels' libgomp), LLVM and Intel.
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadConfig:
    """What the flags ask for; None and 'auto' leave the choice to Baton (see plan_threads)."""

    threads: int | None = None
    wait_policy: str = "auto"
    cpus: tuple[int, ...] | None = None  # pin the worker to these cores

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: must be at least 1, got {self.threads}")
        if self.wait_policy not in WAIT_POLICIES:
            raise ValueError(
                f"thread_wait_policy: must be one of {', '.join(WAIT_POLICIES)}, "
                f"got {self.wait_policy!r}"
            )
        if self.cpus is not None and not self.cpus:
            raise ValueError("cpus: must name at least one CPU")


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    wait_policy: str
    cpus: tuple[int, ...]  # the cores the worker may run on
    pinned: bool  # cpus were narrowed from what the process was given
    quota: float | None  # the cgroup's CPU limit, in cores
    env: tuple[tuple[str, str], ...]  # what the OpenMP runtimes read at load

    def describe(self) -> str:
        quota = "none" if self.quota is None else f"{self.quota:g} cores"
        pin = "pinned to" if self.pinned else "on"
        return (
            f"{self.threads} CPU threads {pin} cores {format_cpu_list(self.cpus)} "
            f"(cgroup quota {quota}), wait policy {self.wait_policy}"
        )

    def as_dict(self) -> dict:
        return {
            "threads": self.threads,
            "wait_policy": self.wait_policy,
            "cpus": format_cpu_list(self.cpus),
            "pinned": self.pinned,
            "quota": self.quota,
        }


def plan_threads(
    config: ThreadConfig,
    environ: Mapping[str, str] | None = None,
    available: tuple[int, ...] | None = None,
    quota: float | None = ...,  # type: ignore[assignment]
) -> ThreadPlan:
    """Threads: the flag, else OMP_NUM_THREADS, else one per core the process may use (its CPU
    set, capped by the cgroup quota: more threads than the quota allows get throttled together
    mid-step). Wait policy: the flag, else what the environment already says, else `brief`."""
    environ = os.environ if environ is None else environ
    given = usable_cpus() if available is None else available
    quota = cpu_quota() if quota is ... else quota
    cpus = given
    if config.cpus is not None:
        outside = set(config.cpus) - set(given)
        if outside:
            raise ValueError(
                f"cpus: {format_cpu_list(tuple(sorted(outside)))} not in this process's CPU set "
                f"({format_cpu_list(given)})"
            )
        cpus = config.cpus
    threads = config.threads
    if threads is None and environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = max(1, int(environ["OMP_NUM_THREADS"]))
    if threads is None:
        threads = len(cpus)
        if quota is not None:
            threads = min(threads, max(1, math.floor(quota + 1e-6)))
    policy = config.wait_policy
    env: dict[str, str] = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if policy == "auto" and any(v in environ for v in WAIT_VARS):
        policy = "environment"  # the operator set it already: leave it
    else:
        policy = "brief" if policy == "auto" else policy
        env |= wait_env(policy)
    return ThreadPlan(threads, policy, cpus, cpus != given, quota, tuple(sorted(env.items())))


def wait_env(policy: str) -> dict[str, str]:
    """The variables that give `policy` (an empty value: unset it)."""
    spins = SPIN_COUNTS[policy]
    if spins is None:
        return {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "", "KMP_BLOCKTIME": "infinite"}
    # NOTE: GNU OpenMP spins GOMP_SPINCOUNT loops whatever OMP_WAIT_POLICY says; LLVM's and
    # Intel's runtimes read KMP_BLOCKTIME (milliseconds) instead, 0 being the closest to brief.
    return {
        "OMP_WAIT_POLICY": "PASSIVE" if spins == 0 else "",
        "GOMP_SPINCOUNT": str(spins),
        "KMP_BLOCKTIME": "0",
    }


def apply_thread_plan(plan: ThreadPlan, environ: MutableMapping[str, str] | None = None) -> None:
    """Put the plan in place: environment for the OpenMP runtimes, then the CPU pinning, then
    torch's thread count. Call it before anything imports torch; later, the waiting policy no
    longer takes (a warning says so)."""
    import sys

    environ = os.environ if environ is None else environ
    late = "torch" in sys.modules
    for key, value in plan.env:
        if value:
            environ[key] = value
        else:
            environ.pop(key, None)
    if plan.pinned:
        os.sched_setaffinity(0, plan.cpus)  # threads started from here on inherit it
    if late:
        logger.warning("torch was loaded before the thread plan: its wait policy may not apply")
    import torch

    torch.set_num_threads(plan.threads)
    logger.info("%s", plan.describe())


def split_cpus(cpus: tuple[int, ...], roles: list[str]) -> list[tuple[int, ...]]:
    """Disjoint core sets for workers of `roles` on one host, as even as the cores allow
    (decode workers take the spare cores first: they set the pace of every stream). Fewer
    cores than workers cannot be split: then every worker gets all of them."""
    n = len(roles)
    if len(cpus) < n:
        return [cpus] * n
    base, spare = divmod(len(cpus), n)
    order = sorted(range(n), key=lambda i: roles[i] != "decode")  # decode first, stable
    sizes = [base] * n
    for i in order[:spare]:
        sizes[i] += 1
    sets, start = [], 0
    for size in sizes:
        sets.append(cpus[start : start + size])
        start += size
    return sets
