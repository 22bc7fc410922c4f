"""/metrics: request latencies and token counts after real requests, per-worker gauges read at
scrape time, and the counters the cluster feeds."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from baton.server.api.metrics import Metrics
from tests.server.api.conftest import ALIAS, Server

PROMPT = "The capital of France is"


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def fresh(cluster):
    s = Server(cluster)
    yield s
    s.stop()


def test_metrics_after_requests(fresh, tokenizer):
    c = fresh.client()
    c.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=50)
    list(c.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=4, stream=True))
    r = fresh.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    n_prompt, n_all = len(tokenizer.encode(PROMPT)), len(fresh.cluster.script.tokens)
    assert m[("baton:prompt_tokens_total",)] == 2 * n_prompt
    assert m[("baton:generation_tokens_total",)] == n_all + 4
    assert m[("baton:request_success_total", ("finished_reason", "stop"))] == 1
    assert m[("baton:request_success_total", ("finished_reason", "length"))] == 1
    assert m[("baton:time_to_first_token_seconds_count",)] == 2
    assert m[("baton:e2e_request_latency_seconds_count",)] == 2
    # one token per event: every token but each request's first has an inter-token latency
    assert m[("baton:inter_token_latency_seconds_count",)] == n_all + 4 - 2
    assert m[("baton:time_to_first_token_seconds_bucket", ("le", "0.001"))] >= 0
    assert ("baton:e2e_request_latency_seconds_bucket", ("le", "7680.0")) in m  # vLLM's buckets


def test_worker_gauges_are_read_at_scrape_time(fresh):
    m = samples(fresh.get("/metrics").text)
    p0, d0 = (("role", "prefill"), ("worker", "p0")), (("role", "decode"), ("worker", "d0"))
    assert m[("baton:num_requests_running", *p0)] == 1
    assert m[("baton:num_requests_waiting", *p0)] == 2
    assert m[("baton:num_requests_running", *d0)] == 3
    assert m[("baton:kv_cache_usage_perc", *d0)] == 0.5
    assert m[("baton:worker_resident_memory_bytes", *d0)] == 700 << 20
    assert m[("baton:worker_kv_cache_resident_bytes", *d0)] == 256 << 20
    assert m[("process_resident_memory_bytes",)] > 0  # the router's own, beside them
    fresh.cluster.worker_list = fresh.cluster.worker_list[1:]  # p0 left
    m = samples(fresh.get("/metrics").text)
    assert ("baton:num_requests_running", *p0) not in m
    assert m[("baton:kv_cache_usage_perc", *d0)] == 0.5


def test_cluster_fed_counters():
    metrics = Metrics()
    metrics.observe_prefix_cache("d0", 100, 40)
    metrics.observe_prefix_cache("d0", 150, 60)
    metrics.observe_prefix_cache("d0", 10, 5)  # restarted: counts from zero again
    metrics.observe_prefix_cache("d1", 7, 0)
    metrics.observe_kv_transfer(1000, 0.01)
    metrics.observe_kv_transfer(500, 2.0)
    metrics.observe_kv_transfer_failure()
    metrics.observe_queue_time(0.4)
    m = samples(metrics.render().decode())
    assert m[("baton:prefix_cache_queries_total", ("worker", "d0"))] == 160
    assert m[("baton:prefix_cache_hits_total", ("worker", "d0"))] == 65
    assert m[("baton:prefix_cache_queries_total", ("worker", "d1"))] == 7
    assert m[("baton:kv_transfer_bytes_total",)] == 1500
    assert m[("baton:kv_transfer_duration_seconds_count",)] == 2
    assert m[("baton:kv_transfer_duration_seconds_bucket", ("le", "0.01"))] == 1
    assert m[("baton:kv_transfer_failures_total",)] == 1
    assert m[("baton:request_queue_time_seconds_count",)] == 1
    # registries are per app: another Metrics starts from zero
    assert samples(Metrics().render().decode())[("baton:kv_transfer_bytes_total",)] == 0


def test_a_failing_workers_call_does_not_break_the_scrape():
    metrics = Metrics()

    def broken() -> list[dict]:
        raise RuntimeError("boom")

    metrics.watch_workers(broken)
    m = samples(metrics.render().decode())
    assert not any(k[0] == "baton:num_requests_running" for k in m)
    assert ("baton:prompt_tokens_total",) in m


def test_workers_are_counted_by_state_and_dead_ones_report_no_gauges():
    metrics = Metrics()
    workers = [
        {"id": "p0", "role": "prefill", "state": "ready", "running": 1, "kv_usage": 0.1},
        {"id": "d0", "role": "decode", "state": "ready", "running": 2, "kv_usage": 0.5},
        {"id": "d1", "role": "decode", "state": "dead", "running": 9, "kv_usage": 0.9},
        {"id": "d2", "role": "decode", "state": "draining", "running": 1, "kv_usage": 0.2},
    ]
    metrics.watch_workers(lambda: workers)
    m = samples(metrics.render().decode())
    assert m[("baton:workers", ("role", "decode"), ("state", "ready"))] == 1
    assert m[("baton:workers", ("role", "decode"), ("state", "dead"))] == 1
    assert m[("baton:workers", ("role", "decode"), ("state", "draining"))] == 1
    assert m[("baton:workers", ("role", "prefill"), ("state", "ready"))] == 1
    assert ("baton:kv_cache_usage_perc", ("role", "decode"), ("worker", "d1")) not in m
    assert m[("baton:kv_cache_usage_perc", ("role", "decode"), ("worker", "d2"))] == 0.2
    metrics.observe_worker_lost()
    assert samples(metrics.render().decode())[("baton:worker_losses_total",)] == 1


def test_every_error_answer_is_counted_by_status(fresh):
    assert fresh.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    bad = {"model": ALIAS, "prompt": "x", "temperature": -1}
    assert fresh.post("/v1/completions", json=bad).status_code == 400
    assert fresh.post("/v1/completions", json=bad).status_code == 400
    fresh.client().completions.create(model=ALIAS, prompt=PROMPT, max_tokens=4)  # not an error
    m = samples(fresh.get("/metrics").text)
    assert m[("baton:request_errors_total", ("status", "400"))] == 2
    assert m[("baton:request_errors_total", ("status", "404"))] == 1
    assert not any(k[0] == "baton:request_errors_total" and k[1][1] == "200" for k in m)


def test_a_forgotten_worker_takes_its_series_with_it():
    metrics = Metrics()
    metrics.observe_prefix_cache("d0", 10, 4)
    metrics.observe_prefix_cache("d1", 5, 1)
    metrics.forget_worker("d0")
    metrics.forget_worker("never-seen")  # nothing to forget: no error
    m = samples(metrics.render().decode())
    assert ("baton:prefix_cache_queries_total", ("worker", "d0")) not in m
    assert m[("baton:prefix_cache_queries_total", ("worker", "d1"))] == 5
    metrics.observe_prefix_cache("d0", 3, 0)  # back under the same id: counts from its totals
    assert (
        samples(metrics.render().decode())[("baton:prefix_cache_queries_total", ("worker", "d0"))]
        == 3
    )
