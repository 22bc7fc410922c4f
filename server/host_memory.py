"""What memory this process may take on its host, and what it holds (Linux; elsewhere the
checks pass and the readings are 0).

Available = the least of the kernel's MemAvailable and, for each cgroup limit over this process
(v2 `memory.max` up the tree, or v1 `memory.limit_in_bytes`), the limit less the group's working
set (usage less inactive file pages, as the kubelet counts it): writing past either brings the
OOM killer, not an error.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# cgroup v1 writes "no limit" as a huge page-aligned number
_NO_LIMIT = 1 << 60


@dataclass(frozen=True)
class Available:
    nbytes: int
    source: str  # what bounds it, e.g. "MemAvailable" or "cgroup memory.max"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        n = int(text)
    except ValueError:
        return None
    return None if n >= _NO_LIMIT else n


def _stat_field(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(the v2 path, the v1 memory controller's path) of this process."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def cgroup_headroom(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """Bytes left under the tightest cgroup memory limit over this process, or None (no limit).

    NOTE: a container sees its own group at the mount's root, a host process its full path;
    both are tried, from the deepest directory up, and the tightest limit wins."""
    v2, v1 = _cgroup_paths(proc_cgroup)
    found: list[int] = []
    for rel, base, limit_f, usage_f, stat_f in (
        (v2, root, "memory.max", "memory.current", "memory.stat"),
        (v1, root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat"),
    ):
        if rel is None:
            continue
        parts = [p for p in rel.split("/") if p]
        dirs = [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
        for d in dirs:
            limit = _read_int(d / limit_f)
            if limit is None:
                continue
            usage = _read_int(d / usage_f) or 0
            inactive = _stat_field(d / stat_f, "inactive_file") or _stat_field(
                d / stat_f, "total_inactive_file"
            )
            found.append(max(0, limit - max(0, usage - inactive)))
    return min(found) if found else None


def available() -> Available | None:
    """What this process may still take, or None where the host says nothing."""
    options = []
    if (m := mem_available()) is not None:
        options.append(Available(m, "MemAvailable"))
    if (c := cgroup_headroom()) is not None:
        options.append(Available(c, "the cgroup's memory limit"))
    return min(options, key=lambda a: a.nbytes) if options else None


def check_fits(nbytes: int, reserve: int, flag: str, avail: Available | None = None) -> None:
    """Raise ValueError naming `flag` unless `nbytes` (plus `reserve` for everything else the
    process will need) fits what the host and its cgroup have left."""
    avail = avail if avail is not None else available()
    if avail is None or nbytes + reserve <= avail.nbytes:
        return
    gib = 2**30
    raise ValueError(
        f"{flag}: the KV cache needs {nbytes / gib:.2f} GiB (+{reserve / gib:.2f} GiB for a "
        f"step's activations) but only {avail.nbytes / gib:.2f} GiB is available "
        f"({avail.source}); lower {flag}"
    )


def rss_bytes(statm: Path = Path("/proc/self/statm")) -> int:
    """This process's resident set size."""
    try:
        return int(statm.read_text().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return 0


_libc = None


def resident_bytes(addr: int, nbytes: int) -> int:
    """How much of [addr, addr + nbytes) of this process's memory is resident (mincore)."""
    global _libc
    if nbytes <= 0 or os.name != "posix":
        return 0
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    page = mmap.PAGESIZE
    start = addr - addr % page
    length = addr + nbytes - start
    pages = -(-length // page)
    vec = ctypes.create_string_buffer(pages)
    if _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) != 0:
        return 0
    resident = int((np.frombuffer(vec.raw, dtype=np.uint8) & 1).sum())
    return min(nbytes, resident * page)
