"""Which float32 CPU linear kernel runs at which row count: measured per host, cached, pinnable.

A plan reads "dense@1,mkl-packed@3": `F.linear` for 1..2 rows, MKL's packed GEMM from 3 rows
(see cpu_linear for the kernels). `auto` times every kernel this torch build has on the model's
own weight shapes at 1..128 rows (`measure`: each call reads its weight from memory, as a
serving step does, unless a step's weights fit in the last-level cache), keeps the fastest per
row count (`choose`), and caches the plan under `$BATON_CACHE_DIR/cpu-linear/`, keyed by the
CPU model and flags, the torch version, the thread count and the shapes: the workers of one
host then run the same plan (the first to start measures, under a file lock; the others read
it), and timing noise can never change their float32 rounding from one start to the next. A
pinned plan is used as is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from baton.server.config import cache_root
from baton.server.host_cpu import cpu_model, isa_flags, llc_bytes
from baton.server.models.cpu_linear import KERNELS, available

logger = logging.getLogger(__name__)

PLAN_VERSION = 2  # bump when the measurement or the choice changes: old cache entries then miss
ROWS = (1, 2, 4, 8, 16, 32, 64, 128)  # decode batches, then prefill-sized chunks
REPEATS = 3
# A kernel that keeps another form of the weight (a second copy of it) must beat the plan's own
# kernels by this much at some row count: within it, timing noise would decide.
MARGIN = 0.15
MAX_FLUSH_BYTES = 256 << 20
MAX_PROBE_ROWS = 8192  # a taller weight (an LM head) is timed on a slice of this many rows


@dataclass(frozen=True)
class LinearPlan:
    ranges: tuple[tuple[int, str], ...]  # (from this many rows, kernel), from 1, increasing

    def __post_init__(self) -> None:
        starts = [r for r, _ in self.ranges]
        if not starts or starts[0] != 1 or starts != sorted(set(starts)):
            raise ValueError(f"cpu_linear: ranges must start at 1 row and increase: {self}")
        for _, kernel in self.ranges:
            if kernel not in KERNELS:
                raise ValueError(
                    f"cpu_linear: unknown kernel {kernel!r} (known: {', '.join(KERNELS)})"
                )

    @classmethod
    def parse(cls, text: str) -> LinearPlan:
        """'mkl-packed' or 'dense@1,mkl-packed@3' (kernel@from-rows, comma-separated)."""
        ranges = []
        for part in text.split(","):
            kernel, _, start = part.strip().partition("@")
            try:
                ranges.append((int(start) if start else 1, kernel))
            except ValueError:
                raise ValueError(f"cpu_linear: {part!r} is not kernel@rows") from None
        return cls(tuple(ranges))

    def __str__(self) -> str:
        if len(self.ranges) == 1:
            return self.ranges[0][1]
        return ",".join(f"{k}@{r}" for r, k in self.ranges)

    @property
    def kernels(self) -> list[str]:
        return list(dict.fromkeys(k for _, k in self.ranges))

    @property
    def forms(self) -> set[str]:
        """The forms of the weight the plan keeps in memory (see cpu_linear.KERNELS)."""
        return {KERNELS[k][0] for k in self.kernels}

    def kernel_for(self, rows: int) -> str:
        kernel = self.ranges[0][1]
        for start, k in self.ranges:
            if rows >= start:
                kernel = k
        return kernel


def check_available(plan: LinearPlan) -> None:
    missing = [k for k in plan.kernels if k not in available()]
    if missing:
        raise ValueError(
            f"cpu_linear: this torch build cannot run {', '.join(missing)} "
            f"(available: {', '.join(available())})"
        )


# ---- measuring ---------------------------------------------------------------------------------

Probe = list[tuple[torch.Tensor, torch.Tensor | None, float]]  # (weight, bias, weight per step)


def probe_weights(units: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Probe:
    """One weight of each shape a step multiplies by, with how many of that shape it reads;
    a weight taller than MAX_PROBE_ROWS is sliced, and counts for the rest."""
    seen: dict[tuple[int, int], list] = {}
    for w, b in units:
        key = tuple(w.shape)
        if key in seen:
            seen[key][2] += 1.0
            continue
        scale = 1.0
        if w.shape[0] > MAX_PROBE_ROWS:
            scale = w.shape[0] / MAX_PROBE_ROWS
            w, b = w[:MAX_PROBE_ROWS], None if b is None else b[:MAX_PROBE_ROWS]
        seen[key] = [w.detach(), None if b is None else b.detach(), scale]
    return [(w, b, n) for w, b, n in seen.values()]


def step_bytes(probe: Probe) -> int:
    """The weight bytes a step's linears read."""
    return int(sum(n * w.numel() * w.element_size() for w, _, n in probe))


def cache_evictor(probe: Probe, llc: int | None = None):
    """A function that pushes the probe's weights out of the caches before a timed call, or None
    where a step's weights fit in the last-level cache (and stay there from step to step).

    NOTE: the probe holds one weight of each shape; timed again and again it stays in cache,
    while a serving step reads every layer's weights once, from memory. On a 2-core EPYC
    (32 MiB L3) that difference made F.linear look 3x faster than it serves at 1..16 rows and
    chose it over oneDNN's packed kernel, which is 1.3-1.9x faster there from memory.
    """
    llc = llc_bytes() if llc is None else llc
    if step_bytes(probe) <= llc:
        return None
    # twice the cache, read through, leaves none of the weight there (capped: a host whose
    # reported last level is larger is a big shared one, of which a core sees a slice)
    flush = torch.empty(min(2 * llc, MAX_FLUSH_BYTES) // 4, dtype=torch.float32).fill_(1.0)
    return lambda: flush.sum()


def measure(
    probe: Probe,
    kernels: tuple[str, ...] | None = None,
    rows: tuple[int, ...] = ROWS,
    evict=cache_evictor,
) -> dict[str, dict[int, float]]:
    """Seconds each kernel (default: every one available) takes for a step's linears at each
    row count (each weight's median over REPEATS calls, times how many of its shape a step
    reads); `evict(probe)` gives what runs before each timed call (see cache_evictor)."""
    kernels = available() if kernels is None else kernels
    flush = evict(probe) or (lambda: None)
    gen = torch.Generator().manual_seed(0)  # not the global stream: loading draws nothing
    xs = {r: {} for r in rows}
    for r in rows:
        for w, _, _ in probe:
            xs[r].setdefault(w.shape[1], torch.randn(r, w.shape[1], generator=gen))
    times: dict[str, dict[int, float]] = {}
    with torch.inference_mode():
        for kernel in kernels:
            build = KERNELS[kernel][1]
            fns = [(build(w, b), w.shape[1], n) for w, b, n in probe]
            times[kernel] = {}
            for r in rows:
                total = 0.0
                for fn, k, n in fns:
                    x = xs[r][k]
                    fn(x)  # the first call of a shape may set up the kernel
                    trials = []
                    for _ in range(REPEATS):
                        flush()
                        t0 = time.perf_counter()
                        fn(x)
                        trials.append(time.perf_counter() - t0)
                    total += n * statistics.median(trials)
                times[kernel][r] = total
            del fns
    return times


def choose(times: dict[str, dict[int, float]]) -> LinearPlan:
    """The fastest kernel per row count, keeping as few forms of the weight as it can.

    First the one form whose best kernels cost least over all row counts (relative to `dense`,
    plain F.linear); then, where another kernel is faster by more than MARGIN at some row
    count, the form of the one that wins most such row counts joins it (memory for a second
    copy of the weights, paid only for a clear gain); and the plan is never slower than
    F.linear by more than MARGIN (the dense form joins where it would be).
    """
    rows = sorted(next(iter(times.values())))
    dense = times["dense"]

    def best(forms: set[str], r: int) -> str:
        kernels = [k for k in times if KERNELS[k][0] in forms]
        return min(kernels, key=lambda k: (times[k][r], k))

    def losing(forms: set[str], than: set[str]) -> list[int]:
        return [
            r for r in rows if times[best(forms, r)][r] > (1 + MARGIN) * times[best(than, r)][r]
        ]

    def cost(forms: set[str]) -> float:
        return sum(times[best(forms, r)][r] / dense[r] for r in rows)

    all_forms = {KERNELS[k][0] for k in times}
    forms = {min(sorted(all_forms), key=lambda f: cost({f}))}
    if lost := losing(forms, all_forms):
        winners = [KERNELS[best(all_forms, r)][0] for r in lost]
        forms.add(max(sorted(set(winners)), key=winners.count))
    if losing(forms, {"dense"}):
        forms.add("dense")
    ranges: list[tuple[int, str]] = []
    for r in rows:
        k = best(forms, r)
        if not ranges or ranges[-1][1] != k:
            ranges.append((1 if not ranges else r, k))
    return LinearPlan(tuple(ranges))


# ---- the per-host cache --------------------------------------------------------------------------


def plan_key(probe: Probe) -> dict:
    """What a measured plan depends on: another value of any of these measures again."""
    return {
        "version": PLAN_VERSION,
        "cpu": cpu_model(),
        "flags": isa_flags(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "kernels": list(available()),
        "shapes": [[*w.shape, n] for w, _, n in probe],
    }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def measured_plan(probe: Probe, cache_dir: Path | None = None) -> tuple[LinearPlan, str]:
    """(plan, where it came from: 'cached' or 'measured'), measuring once per host and key."""
    key = plan_key(probe)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir or cache_root()) / "cpu-linear"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = _locked(folder / f"{digest}.lock")
        lock.__enter__()
    except OSError as e:  # a read-only home: measure, remember nothing
        logger.warning("no cache for the CPU linear plan (%s): measuring in this process", e)
        return choose(measure(probe)), "measured"
    try:
        entry = folder / f"{digest}.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            cached = json.loads(entry.read_text())
            if cached["key"] == key:
                return LinearPlan.parse(cached["plan"]), "cached"
        t0 = time.perf_counter()
        times = measure(probe)
        plan = choose(times)
        ms = {k: {str(r): round(t * 1e3, 4) for r, t in v.items()} for k, v in times.items()}
        record = {"key": key, "plan": str(plan), "step_ms": ms}
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(entry)
        logger.info("CPU linear kernels timed in %.2f s: %s", time.perf_counter() - t0, ms)
        return plan, "measured"
    finally:
        lock.__exit__(None, None, None)


def resolve_plan(spec: str, units: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple:
    """(plan, where it came from: 'pinned', 'cached' or 'measured') for a model whose step
    multiplies by `units` (see LlamaForCausalLM.cpu_linear_units)."""
    if spec != "auto":
        plan = LinearPlan.parse(spec)
        check_available(plan)
        return plan, "pinned"
    return measured_plan(probe_weights(units))
