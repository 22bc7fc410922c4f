"""Prometheus metrics of one router, in their own registry, named like vLLM's with `baton:`.

The HTTP layer records request latencies and token counts; the cluster reports what only it
sees (prefix-cache totals from heartbeats, KV transfers, queue time). Per-worker gauges are read
from `cluster.workers()` at scrape time, so a worker that left disappears from the next scrape.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter as Counter_
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
KV_TRANSFER_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

# (metric, help, key in a workers() dict)
_WORKER_GAUGES = (
    ("baton:num_requests_running", "Requests running on the worker.", "running"),
    ("baton:num_requests_waiting", "Requests waiting on the worker.", "waiting"),
    ("baton:kv_cache_usage_perc", "KV-cache usage of the worker. 1 means 100 percent.", "kv_usage"),
    ("baton:worker_resident_memory_bytes", "Resident memory of the worker process.", "rss_bytes"),
    (
        "baton:worker_kv_cache_resident_bytes",
        "Bytes of the worker's KV cache that are resident in memory.",
        "kv_resident_bytes",
    ),
)


class _WorkerGauges:
    """A custom collector: one sample per worker and gauge, read when scraped."""

    def __init__(self) -> None:
        self.source: Callable[[], list[dict]] | None = None

    def describe(self):
        labels = ["worker", "role"]
        families = [GaugeMetricFamily(n, doc, labels=labels) for n, doc, _ in _WORKER_GAUGES]
        families.append(
            GaugeMetricFamily(
                "baton:workers", "Registered workers by role and state.", labels=["role", "state"]
            )
        )
        return families

    def collect(self):
        *families, counts = self.describe()
        try:
            workers = self.source() if self.source is not None else []
        except Exception:
            logger.exception("workers() failed during a metrics scrape")
            workers = []
        by_state = Counter_((str(w.get("role", "")), str(w.get("state", ""))) for w in workers)
        for (role, state), n in sorted(by_state.items()):
            counts.add_metric([role, state], float(n))
        for w in workers:
            if w.get("state") == "dead":  # runs nothing; its last report would mislead
                continue
            labels = [str(w.get("id", "")), str(w.get("role", ""))]
            for fam, (_, _, key) in zip(families, _WORKER_GAUGES, strict=True):
                value = w.get(key)
                if isinstance(value, int | float):
                    fam.add_metric(labels, float(value))
        return [*families, counts]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # the router's own process_resident_memory_bytes, CPU, fds
        self.ttft = Histogram(
            "baton:time_to_first_token_seconds",
            "Time from the request's arrival to its first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "baton:inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "baton:e2e_request_latency_seconds",
            "Time from the request's arrival to its last token.",
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "baton:request_queue_time_seconds",
            "Time requests spent waiting before they ran (reported by the cluster).",
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "baton:prompt_tokens", "Prompt tokens of admitted requests.", registry=r
        )
        self.generation_tokens = Counter("baton:generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(
            "baton:request_success",
            "Finished requests (each of n choices counts).",
            ["finished_reason"],
            registry=r,
        )
        self.prefix_queries = Counter(
            "baton:prefix_cache_queries",
            "Prefix cache queries, in tokens.",
            ["worker"],
            registry=r,
        )
        self.prefix_hits = Counter(
            "baton:prefix_cache_hits", "Prefix cache hits, in tokens.", ["worker"], registry=r
        )
        self.kv_bytes = Counter(
            "baton:kv_transfer_bytes", "KV-cache bytes sent from prefill to decode.", registry=r
        )
        self.kv_duration = Histogram(
            "baton:kv_transfer_duration_seconds",
            "Duration of one request's KV handoff, from its first chunk sent to the decode "
            "worker's acknowledgement.",
            buckets=KV_TRANSFER_BUCKETS,
            registry=r,
        )
        self.kv_skipped = Counter(
            "baton:kv_transfer_skipped_bytes",
            "KV-cache bytes a handoff did not send: the decode worker held those blocks already.",
            registry=r,
        )
        self.kv_failures = Counter(
            "baton:kv_transfer_failures", "KV handoffs that failed.", registry=r
        )
        self.request_errors = Counter(
            "baton:request_errors",
            "Requests answered with an error (the HTTP status, or a stream's error event's).",
            ["status"],
            registry=r,
        )
        self.worker_losses = Counter(
            "baton:worker_losses",
            "Workers lost while registered (died, went silent, or left); their requests resumed.",
            registry=r,
        )
        self.routed_cached_tokens = Counter(
            "baton:routing_cached_prompt_tokens",
            "Prompt tokens the worker chosen for a request's prompt already held in its prefix "
            "cache (as the router's index of KV events saw it): prefill saved by routing.",
            registry=r,
        )
        self.placements = Counter(
            "baton:requests_placed",
            "Requests placed, by path: handed_off (prefill worker, then KV to a decode worker), "
            "local (a decode worker prefilled it itself) or colocated.",
            ["path"],
            registry=r,
        )
        self._workers = _WorkerGauges()
        r.register(self._workers)
        self._prefix_totals: dict[str, tuple[int, int]] = {}

    def watch_workers(self, source: Callable[[], list[dict]]) -> None:
        """Where the per-worker gauges come from (the cluster's `workers`)."""
        self._workers.source = source

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- recorded by the HTTP layer -------------------------------------------------------

    def observe_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens.inc(num_tokens)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_tokens(self, num_tokens: int, seconds: float) -> None:
        """`num_tokens` more tokens arrived `seconds` after the previous ones."""
        for _ in range(num_tokens):
            self.itl.observe(seconds / num_tokens)

    def observe_finish(self, finish_reason: str, e2e_seconds: float, num_tokens: int) -> None:
        self.e2e.observe(e2e_seconds)
        self.generation_tokens.inc(num_tokens)
        self.request_success.labels(finished_reason=finish_reason).inc()

    def observe_error(self, status: int) -> None:
        self.request_errors.labels(status=str(status)).inc()

    # ---- reported by the cluster ----------------------------------------------------------

    def observe_worker_lost(self) -> None:
        self.worker_losses.inc()

    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def observe_prefix_cache(self, worker_id: str, queries_total: int, hits_total: int) -> None:
        """A worker's running totals (as in its heartbeat); the counters get the increase.
        Totals that went down mean the worker restarted: they count from zero again."""
        last_q, last_h = self._prefix_totals.get(worker_id, (0, 0))
        dq = queries_total - last_q if queries_total >= last_q else queries_total
        dh = hits_total - last_h if hits_total >= last_h else hits_total
        self._prefix_totals[worker_id] = (queries_total, hits_total)
        self.prefix_queries.labels(worker=worker_id).inc(max(dq, 0))
        self.prefix_hits.labels(worker=worker_id).inc(max(dh, 0))

    def forget_worker(self, worker_id: str) -> None:
        """The worker is gone for good: its series go too (new ids come with every restart)."""
        if self._prefix_totals.pop(worker_id, None) is None:
            return
        for counter in (self.prefix_queries, self.prefix_hits):
            with contextlib.suppress(KeyError):
                counter.remove(worker_id)

    def observe_routing(self, cached_tokens: int, handed_off: bool, local: bool) -> None:
        self.routed_cached_tokens.inc(cached_tokens)
        path = "handed_off" if handed_off else "local" if local else "colocated"
        self.placements.labels(path=path).inc()

    def observe_kv_transfer(self, nbytes: int, seconds: float, skipped_nbytes: int = 0) -> None:
        self.kv_skipped.inc(skipped_nbytes)
        self.kv_bytes.inc(nbytes)
        self.kv_duration.observe(seconds)

    def observe_kv_transfer_failure(self) -> None:
        self.kv_failures.inc()
