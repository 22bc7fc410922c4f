"""The thread plan: how many CPU threads, how they wait, on which cores; and that it takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from baton.server.cpu_threads import SPIN_COUNTS, ThreadConfig, plan_threads

CPUS = (0, 1, 2, 3)


def plan(config=None, environ=None, available=CPUS, quota=None):
    return plan_threads(config or ThreadConfig(), environ or {}, available, quota)


def test_by_default_one_thread_per_core_the_process_may_use():
    p = plan()
    assert (p.threads, p.cpus, p.pinned, p.wait_policy) == (4, CPUS, False, "brief")
    env = dict(p.env)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "4"
    assert env["GOMP_SPINCOUNT"] == str(SPIN_COUNTS["brief"])
    assert env["OMP_WAIT_POLICY"] == ""  # unset: GOMP_SPINCOUNT alone decides


def test_the_cgroup_quota_caps_the_threads():
    assert plan(quota=2.5).threads == 2  # a third thread would be throttled mid-step
    assert plan(quota=0.5).threads == 1
    assert plan(quota=16.0).threads == 4  # no more threads than cores
    assert "cgroup quota 2.5 cores" in plan(quota=2.5).describe()


def test_flags_win_over_the_environment_and_the_environment_over_baton():
    environ = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    p = plan(environ=environ)
    assert p.threads == 3 and p.wait_policy == "environment"
    assert "OMP_WAIT_POLICY" not in dict(p.env)  # the operator's own setting stays
    p = plan(ThreadConfig(threads=2, wait_policy="passive"), environ=environ)
    assert p.threads == 2 and p.wait_policy == "passive"
    assert dict(p.env)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert dict(plan(ThreadConfig(wait_policy="active")).env)["OMP_WAIT_POLICY"] == "ACTIVE"


def test_pinning_narrows_the_cores_and_refuses_others_by_name():
    p = plan(ThreadConfig(cpus=(2, 3)))
    assert (p.threads, p.cpus, p.pinned) == (2, (2, 3), True)
    assert "pinned to cores 2-3" in p.describe()
    with pytest.raises(ValueError, match=r"cpus: 7-8 not in this process's CPU set \(0-3\)"):
        plan(ThreadConfig(cpus=(1, 7, 8)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threads": 0}, "threads: must be at least 1"),
        ({"wait_policy": "spin"}, "thread_wait_policy: must be one of"),
        ({"cpus": ()}, "cpus: must name at least one CPU"),
    ],
)
def test_bad_thread_flags_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThreadConfig(**kwargs)


# A fresh interpreter applies a plan, then runs parallel work and sleeps: the CPU time it burns
# while it sleeps is its OpenMP threads waiting for work that never comes.
APPLY = """
import json, os, resource, sys, time
from baton.server.cpu_threads import ThreadConfig, apply_thread_plan, plan_threads
plan = plan_threads(ThreadConfig(threads=2, wait_policy=sys.argv[1], cpus=(0, 1)), environ={})
apply_thread_plan(plan)
import torch
a = torch.randn(512, 512)
for _ in range(20):
    a @ a  # parallel regions on both threads
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
before = cpu()
time.sleep(1.0)
print(json.dumps({"idle_cpu_s": cpu() - before, "threads": torch.get_num_threads(),
                  "affinity": sorted(os.sched_getaffinity(0)),
                  "spincount": os.environ.get("GOMP_SPINCOUNT")}))
"""


def run_plan(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
    out = subprocess.run(
        [sys.executable, "-c", APPLY, policy],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to spin on")
def test_the_wait_policy_takes_so_an_idle_process_burns_no_cpu():
    brief, active = run_plan("brief"), run_plan("active")
    assert brief["threads"] == 2 and brief["affinity"] == [0, 1]
    assert brief["spincount"] == str(SPIN_COUNTS["brief"])
    # active: the other thread spins all through the sleep, as far as a busy machine lets it
    # (it got 16% of a core beside a loaded test run); brief: it sleeps too
    assert brief["idle_cpu_s"] < 0.05
    assert active["idle_cpu_s"] > max(0.1, 5 * brief["idle_cpu_s"])


def test_cpu_lists_parse_and_print_as_taskset_writes_them():
    from baton.server.host_cpu import format_cpu_list, parse_cpu_list

    assert parse_cpu_list("0-3,6, 8-9") == (0, 1, 2, 3, 6, 8, 9)
    assert format_cpu_list((0, 1, 2, 3, 6, 8, 9)) == "0-3,6,8-9"
    for bad in ("", "a", "3-1", "-2", "1,,2"):
        with pytest.raises(ValueError, match="cpus: .* is not a CPU list"):
            parse_cpu_list(bad)


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_tightest_on_the_path(tmp_path):
    from baton.server.host_cpu import cpu_quota

    root = tmp_path / "cgroup"
    write(tmp_path / "self", "0::/kubepods/pod1/ctr\n")
    write(root / "kubepods" / "cpu.max", "max 100000\n")
    write(root / "kubepods" / "pod1" / "cpu.max", "300000 100000\n")
    write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "150000 100000\n")
    assert cpu_quota(root, tmp_path / "self") == 1.5
    write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")
    assert cpu_quota(root, tmp_path / "self") == 3.0
    write(root / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    assert cpu_quota(root, tmp_path / "self") is None


def test_cgroup_v1_quota_and_none_where_nothing_is_readable(tmp_path):
    from baton.server.host_cpu import cpu_quota

    root = tmp_path / "cgroup"
    write(tmp_path / "self", "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n0::/\n")
    d = root / "cpu,cpuacct" / "docker" / "abc"
    write(d / "cpu.cfs_quota_us", "200000\n")
    write(d / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(root, tmp_path / "self") == 2.0
    write(d / "cpu.cfs_quota_us", "-1\n")
    assert cpu_quota(root, tmp_path / "self") is None
    assert cpu_quota(root, tmp_path / "missing") is None


def test_the_last_level_cache_is_the_highest_level_sysfs_lists(tmp_path):
    from baton.server.host_cpu import DEFAULT_LLC_BYTES, llc_bytes

    for i, (level, size) in enumerate([(1, "48K"), (1, "32K"), (2, "1024K"), (3, "32768K")]):
        write(tmp_path / f"index{i}" / "level", f"{level}\n")
        write(tmp_path / f"index{i}" / "size", f"{size}\n")
    assert llc_bytes(tmp_path) == 32 << 20
    write(tmp_path / "index3" / "size", "2M\n")
    assert llc_bytes(tmp_path) == 2 << 20
    assert llc_bytes(tmp_path / "missing") == DEFAULT_LLC_BYTES
