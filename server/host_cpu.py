"""Facts about this host's CPU that Baton's choices depend on: model, vector extensions, the cores
this process may use and its cgroup's CPU quota."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# the vector extensions CPU kernels (and figures) depend on; AMD EPYC hosts have avx2 only
ISA_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
)


def _cpuinfo(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"


def isa_flags() -> list[str]:
    """Which of ISA_FLAGS this CPU has (lscpu's flags line)."""
    flags = set((_cpuinfo("flags") or "").split())
    return [f for f in ISA_FLAGS if f in flags]


DEFAULT_LLC_BYTES = 32 << 20  # where sysfs says nothing: a common server last-level cache


def _size_bytes(text: str) -> int:
    """sysfs cache sizes: '32768K', '1M', '512'."""
    text = text.strip().upper()
    unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * unit


def llc_bytes(cpu_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The size of this CPU's last-level cache (the highest level sysfs lists), in bytes."""
    best = (0, 0)
    try:
        for index in cpu_dir.glob("index*"):
            level = int((index / "level").read_text())
            best = max(best, (level, _size_bytes((index / "size").read_text())))
    except (OSError, ValueError):
        return DEFAULT_LLC_BYTES
    return best[1] or DEFAULT_LLC_BYTES


def usable_cpus() -> tuple[int, ...]:
    """The cores this process may run on (its CPU set, as containers and taskset narrow it)."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,6' -> (0, 1, 2, 3, 6), the format of taskset and cgroups' cpuset."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError:
        raise ValueError(f"cpus: {text!r} is not a CPU list such as '0-3,6'") from None
    return tuple(sorted(cpus))


def format_cpu_list(cpus: tuple[int, ...]) -> str:
    runs: list[str] = []
    for c in sorted(cpus):
        if runs and runs[-1].split("-")[-1] == str(c - 1):
            runs[-1] = f"{runs[-1].split('-')[0]}-{c}"
        else:
            runs.append(str(c))
    return ",".join(runs)


def cpu_quota(
    cgroup_root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The CPU limit of this process's cgroup and its ancestors, in cores (None: unlimited).

    cgroup v2 keeps it in `cpu.max` ("max 100000" or "150000 100000"), v1 in
    `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none). A container sees its own cgroup as the
    root; without a cgroup namespace its path is under the root.
    """
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            for d in _ancestors(cgroup_root, path):
                limits += _v2_limit(d / "cpu.max")
        elif "cpu" in controllers.split(","):
            for base in (cgroup_root / controllers, cgroup_root / "cpu"):
                if base.is_dir():
                    for d in _ancestors(base, path):
                        limits += _v1_limit(d)
                    break
    return min(limits) if limits else None


def _ancestors(root: Path, path: str) -> list[Path]:
    parts = [p for p in path.split("/") if p]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_limit(f: Path) -> list[float]:
    try:
        quota, period = f.read_text().split()[:2]
    except (OSError, ValueError):
        return []
    return [] if quota == "max" else [int(quota) / int(period)]


def _v1_limit(d: Path) -> list[float]:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return []
    return [] if quota <= 0 or period <= 0 else [quota / period]
