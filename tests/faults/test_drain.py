"""SIGTERM drains a worker: it takes nothing new, finishes (or gives back) what it has,
deregisters and exits 0. Scaling the decode pool from 2 to 1 under load loses no request."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from baton.bench.cluster import Cluster
from tests.faults.conftest import random_prompt

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(cut_model):
    with Cluster.running({"p0": ("prefill",), "d0": ("decode",)}, model=cut_model) as c:
        yield c


def load(c, prompts, max_tokens, results, gap_s=0.2, first=0):
    """Stream `prompts` from threads, `gap_s` apart; results[first + i] gets each outcome."""

    def one(i):
        try:
            results[i] = c.stream(prompts[i - first], max_tokens)
        except Exception as e:  # kept, so the assertion below shows what went wrong
            results[i] = (repr(e), getattr(getattr(e, "response", None), "text", None))

    threads = []
    for i in range(first, first + len(prompts)):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
        time.sleep(gap_s)
    return threads


def test_scaling_decode_from_two_to_one_under_load_loses_nothing(cluster, reference):
    c = cluster
    c.add_worker("d1", "decode")
    prompts = [random_prompt(60 + i, 24) for i in range(8)]
    results: dict[int, tuple] = {}
    threads = load(c, prompts[:4], 64, results)
    c.signal("d0", signal.SIGTERM)  # mid-load: it has streams running
    threads += load(c, prompts[4:], 64, results, first=4)  # these must all go to d1
    for t in threads:
        t.join(timeout=180)
    assert c.workers["d0"].wait(timeout=60) == 0  # drained, then exited cleanly
    c.wait_worker("d0", None)  # deregistered: the router no longer lists it
    assert [results[i] for i in range(8)] == [(t, None) for t in reference.many(prompts, 64)]
    c.wait_idle()


def test_work_left_at_the_drain_deadline_is_resumed_elsewhere(cluster, reference):
    c = cluster
    c.add_worker("d1", "decode", "--drain-timeout", "0.5")
    # d0 frozen for a moment: at least one of the two goes to d1 (as its decode worker).
    c.signal("d0", signal.SIGSTOP)
    prompts = [random_prompt(70 + i, 24) for i in range(2)]
    results: dict[int, tuple] = {}
    threads = load(c, prompts, 300, results, gap_s=0.0)
    time.sleep(1.0)
    on_d1 = c.worker_states()["d1"]["assigned"]
    assert on_d1 >= 1
    c.signal("d0", signal.SIGCONT)
    c.signal("d1", signal.SIGTERM)  # its streams are far from done in 0.5 s: given back
    for t in threads:
        t.join(timeout=180)
    assert c.workers["d1"].wait(timeout=30) == 0
    assert [results[i] for i in range(2)] == [(t, None) for t in reference.many(prompts, 300)]
    # d0 took each of them (at first, or when d1 gave it back): none finished on d1 in time
    assert c.worker_states()["d0"]["served"] == 2
    c.wait_idle()
