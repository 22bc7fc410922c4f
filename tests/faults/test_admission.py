"""Overload and deadlines: bounded admission answers 429 at once, a request past its deadline
ends with 504 (or an error event) and frees its KV, one that could never fit is a 400."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from baton.bench.cluster import Cluster
from tests.faults.conftest import random_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    with Cluster.running(
        {"p0": ("prefill",), "d0": ("decode", "--kv-cache-gib", "0.02")},
        router_args=("--max-num-requests", "2", "--request-timeout", "5"),
    ) as c:
        yield c


def test_past_the_bound_requests_get_429_within_milliseconds(cluster):
    statuses, slow_429 = [], []

    def one(i):
        t0 = time.monotonic()
        body = cluster.body(random_prompt(40 + i, 16), 24)
        r = httpx.post(cluster.url + "/v1/completions", json=body, timeout=60)
        statuses.append(r.status_code)
        if r.status_code == 429:
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "overloaded"
            assert r.headers["retry-after"] == "1"
            if time.monotonic() - t0 > 0.5:
                slow_429.append(time.monotonic() - t0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(set(statuses)) == [200, 429], statuses
    assert statuses.count(200) >= 2 and not slow_429
    cluster.wait_idle()


def test_a_request_past_its_deadline_gets_504_and_frees_its_kv(cluster):
    t0 = time.monotonic()
    body = cluster.body(random_prompt(50, 16), 300)
    r = httpx.post(cluster.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 504, r.text
    assert 4.5 < time.monotonic() - t0 < 10
    assert r.json()["error"]["code"] == "request_timeout"
    _, error = cluster.stream(random_prompt(51, 16), 300)
    assert error is not None and error["code"] == "request_timeout"
    cluster.wait_idle()


def test_a_request_that_could_never_fit_in_kv_is_a_400(cluster):
    blocks = cluster.worker_states()["d0"]["num_blocks"]
    body = cluster.body(random_prompt(52, 16), blocks * 16 + 16)  # within max_model_len
    r = httpx.post(cluster.url + "/v1/completions", json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert "KV blocks" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "max_tokens"
