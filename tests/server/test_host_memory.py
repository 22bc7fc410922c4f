"""What the host and its cgroup let a process take, and what it holds."""

from __future__ import annotations

import mmap

import pytest
import torch

from baton.server import host_memory as hm

GIB = 2**30


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_mem_available_reads_meminfo(tmp_path):
    f = write(tmp_path / "meminfo", "MemTotal: 100 kB\nMemAvailable:   2048 kB\nMemFree: 1 kB\n")
    assert hm.mem_available(f) == 2048 * 1024
    assert hm.mem_available(tmp_path / "missing") is None


def test_cgroup_v2_takes_the_tightest_limit_up_the_tree_less_the_working_set(tmp_path):
    proc = write(tmp_path / "cgroup", "0::/kube/pod1\n")
    root = tmp_path / "fs"
    write(root / "kube" / "pod1" / "memory.max", "max\n")  # the pod: no limit of its own
    write(root / "kube" / "memory.max", f"{8 * GIB}\n")
    write(root / "kube" / "memory.current", f"{3 * GIB}\n")
    write(root / "kube" / "memory.stat", f"anon 1\ninactive_file {1 * GIB}\n")
    # usage 3 GiB, of which 1 GiB is reclaimable file cache: 8 - 2 left
    assert hm.cgroup_headroom(root, proc) == 6 * GIB


def test_cgroup_v1_reads_the_memory_controller_and_ignores_its_no_limit_value(tmp_path):
    proc = write(tmp_path / "cgroup", "4:memory:/docker/abc\n1:cpu:/\n")
    mem = tmp_path / "fs" / "memory"
    write(mem / "docker" / "abc" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert hm.cgroup_headroom(tmp_path / "fs", proc) is None
    write(mem / "docker" / "abc" / "memory.limit_in_bytes", f"{4 * GIB}\n")
    write(mem / "docker" / "abc" / "memory.usage_in_bytes", f"{1 * GIB}\n")
    write(mem / "docker" / "abc" / "memory.stat", "total_inactive_file 0\n")
    assert hm.cgroup_headroom(tmp_path / "fs", proc) == 3 * GIB


def test_check_fits_names_the_flag_and_the_bound():
    avail = hm.Available(4 * GIB, "the cgroup's memory limit")
    hm.check_fits(3 * GIB, GIB // 2, "--kv-cache-gib", avail)  # fits
    with pytest.raises(ValueError, match="--kv-cache-gib") as e:
        hm.check_fits(4 * GIB, GIB // 2, "--kv-cache-gib", avail)
    assert "cgroup" in str(e.value) and "4.00 GiB" in str(e.value)


def test_resident_bytes_sees_pages_once_written():
    t = torch.empty(64 * mmap.PAGESIZE // 4)  # large enough to get pages of its own
    before = hm.resident_bytes(t.data_ptr(), t.nbytes)
    t.fill_(1.0)
    assert hm.resident_bytes(t.data_ptr(), t.nbytes) == t.nbytes
    assert before <= t.nbytes
    assert hm.rss_bytes() > t.nbytes


def test_serve_checks_its_workers_caches_together_before_starting_any(tmp_path):
    import subprocess
    import sys

    avail = hm.available()
    assert avail is not None
    each = round(0.4 * avail.nbytes / GIB, 2)  # one fits, four do not
    # NOTE: a model that does not exist: were the check missing, serve would stop at the model
    # (another message), never start four workers that each pass their own check.
    cmd = [sys.executable, "-m", "baton.server.cli", "serve", "--device", "cpu",
           "--model", str(tmp_path / "no-model"), "--prefill-workers", "2",
           "--decode-workers", "2", "--kv-cache-gib", str(each)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "--kv-cache-gib (4 workers" in p.stderr and "available" in p.stderr
