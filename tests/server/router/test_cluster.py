"""The router's ZeroMQ cluster with real workers (threads, loopback sockets, a tiny dummy model):
greedy tokens through a disaggregated handoff equal the offline engine; bad workers are refused."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest

from baton import SamplingParams
from baton.scheduler.placement import WorkerState
from baton.scheduler.routing import RoutingConfig
from baton.server.api.cluster import NoWorkerAvailable
from baton.server.api.metrics import Metrics
from baton.server.config import EngineConfig
from baton.server.engine import LLMEngine
from baton.server.router.cluster import RouterConfig, ZmqCluster
from baton.server.wire import messages as m
from baton.server.worker.config import WorkerConfig
from baton.server.worker.worker import Worker

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = [[5 + (i * 11 + j) % 200 for j in range(n)] for i, n in enumerate([4, 20, 45])]


def engine_config(model, **kw):
    return EngineConfig(
        model=model, load_format="dummy", seed=0, show_progress=False, detokenize=False, **kw
    )


def start_worker(endpoint, model, role, wid, **kw):
    w = Worker(
        WorkerConfig(
            role=role,
            router=endpoint,
            engine=engine_config(model, **kw),
            worker_id=wid,
            heartbeat_s=0.2,
        )
    )
    w.errors = []

    def run():
        try:
            w.run()
        except RuntimeError as e:  # a refused registration
            w.errors.append(str(e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return w, t


async def wait_for(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def collect(cluster, rid, prompt, params):
    tokens = []
    async for ev in await cluster.generate(rid, prompt, params):
        tokens += ev.token_ids
        if ev.finish_reason is not None:
            return tokens, ev.finish_reason
    raise AssertionError("stream ended without a finish")


@pytest.mark.parametrize("mode", ["disagg", "colocated", "local"])
def test_tokens_through_the_router_equal_the_offline_engine(tiny_config_dir, mode):
    """`local`: a disagg pool whose decode worker prefills short prompts itself."""
    ref = LLMEngine(engine_config(tiny_config_dir))
    want = []
    for i, p in enumerate(PROMPTS):
        ref.add_request(str(i), p, GREEDY)
        toks = []
        while ref.has_unfinished_requests():
            for out in ref.step():
                toks = out.outputs[0].token_ids
        want.append(toks)

    async def main():
        metrics = Metrics()
        local = 10_000 if mode == "local" else 0
        routing = RoutingConfig(max_local_prefill_tokens=local, max_local_turn_tokens=local)
        pool_mode = "colocated" if mode == "colocated" else "disagg"
        config = RouterConfig(mode=pool_mode, routing=routing)
        cluster = ZmqCluster(config, None, 512, "tiny", metrics=metrics)
        cluster.start()
        roles = ["prefill", "decode"] if pool_mode == "disagg" else ["both"]
        workers = [
            start_worker(
                cluster.endpoint, tiny_config_dir, r, f"{r}-{mode}", max_num_batched_tokens=16
            )
            for r in roles
        ]
        try:
            with pytest.raises(NoWorkerAvailable):
                if not cluster.health()[0]:
                    await cluster.generate("early", PROMPTS[0], GREEDY)
            await wait_for(lambda: cluster.health()[0])
            got = await asyncio.gather(
                *(collect(cluster, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS))
            )
            assert [g[0] for g in got] == want
            assert all(g[1] == "length" for g in got)
            # What the workers reported: one queue time per request, one handoff per prompt
            # carrying exactly its blocks, no failures.
            sample = metrics.registry.get_sample_value
            assert sample("baton:request_queue_time_seconds_count") == len(PROMPTS)
            handoffs = sample("baton:kv_transfer_duration_seconds_count")
            shipped = sample("baton:kv_transfer_bytes_total")
            assert sample("baton:kv_transfer_failures_total") == 0
            placed = sample(
                "baton:requests_placed_total",
                {
                    "path": {"local": "local"}.get(
                        mode, "handed_off" if mode == "disagg" else "colocated"
                    )
                },
            )
            assert placed == len(PROMPTS)
            if mode == "disagg":
                block = workers[0][0].engine.runner.kv_cache[0].nbytes
                assert handoffs == len(PROMPTS)
                assert shipped == block * sum(-(-len(p) // 16) for p in PROMPTS)
            else:
                assert handoffs == 0 and shipped == 0
            # Everything freed on every worker once the streams are done.
            await wait_for(
                lambda: all(
                    w.engine.batcher.block_manager.num_used_blocks == 0 and not w.engine.handoffs
                    for w, _ in workers
                )
            )
            # A client that goes away mid-stream: aborted everywhere, KV freed on both sides.
            it = await cluster.generate(
                "gone", PROMPTS[2], SamplingParams(max_tokens=400, ignore_eos=True)
            )
            await it.__anext__()
            await it.aclose()
            await wait_for(
                lambda: all(
                    w.engine.batcher.block_manager.num_used_blocks == 0
                    and not w.engine.has_unfinished_requests()
                    for w, _ in workers
                )
            )
            # A worker whose KV layout differs is refused and stops.
            bad, t = start_worker(
                cluster.endpoint,
                tiny_config_dir,
                "decode" if pool_mode == "disagg" else "both",
                f"bad-{mode}",
                block_size=32,
            )
            await asyncio.to_thread(t.join, 30)
            assert not t.is_alive() and f"bad-{mode}" not in cluster.pool.workers
            assert "refused" in bad.errors[0] and "layout" in bad.errors[0]
        finally:
            for w, _ in workers:
                w.alive = False
            for _, t in workers:
                t.join(timeout=10)
            await cluster.stop()

    asyncio.run(main())


def report(request_id: str, nbytes: int, seconds: float, ok: bool) -> m.KVReport:
    return m.KVReport(request_id=request_id, nbytes=nbytes, seconds=seconds, ok=ok)


def test_worker_reports_feed_queue_time_and_kv_transfer_metrics():
    async def main():
        metrics = Metrics()
        cluster = ZmqCluster(RouterConfig(), None, 512, "tiny", metrics=metrics)
        layout = (2, 16, 2, 16, "float32")
        cluster.pool.workers["p"] = WorkerState(
            "p", "prefill", 1, "h", "tiny", layout, "", 512, 8, 0
        )
        try:
            tok = m.TokenOutput(
                request_id="a",
                worker_id="p",
                token_ids=[3],
                logprobs=None,
                finish_reason=None,
                stop_reason=None,
                num_cached_tokens=0,
                queue_time_s=0.3,
            )
            failed = m.RequestFailed(request_id="a", worker_id="p", error="x", retry=True)
            dispatch = cluster.control._dispatch
            await dispatch("p", report("a", 4096, 0.02, True))
            await dispatch("p", report("b", 1024, 0.5, False))
            await dispatch("p", tok)
            await dispatch("p", dataclasses.replace(tok, token_ids=[4], queue_time_s=None))
            await dispatch("p", failed)
            await dispatch("stranger", report("c", 1, 0.1, True))  # dropped
        finally:
            await cluster.stop()
        sample = metrics.registry.get_sample_value
        assert sample("baton:kv_transfer_bytes_total") == 4096
        assert sample("baton:kv_transfer_duration_seconds_count") == 1
        assert sample("baton:kv_transfer_duration_seconds_sum") == pytest.approx(0.02)
        assert sample("baton:kv_transfer_failures_total") == 1
        assert sample("baton:request_queue_time_seconds_count") == 1
        assert sample("baton:request_queue_time_seconds_sum") == pytest.approx(0.3)

    asyncio.run(main())


def test_a_worker_that_stops_beating_is_counted_lost_and_its_requests_resume():
    async def main():
        metrics = Metrics()
        cluster = ZmqCluster(
            RouterConfig(heartbeat_timeout_s=5.0), None, 512, "tiny", metrics=metrics
        )
        layout = (2, 16, 2, 16, "float32")
        w = WorkerState("p", "prefill", 1, "h", "tiny", layout, "", 512, 8, 0)
        w.last_seen = 100.0
        cluster.pool.workers["p"] = w
        cluster.pool.assign("a", ["p"])
        lost = []
        cluster.relay.lost = lambda rid, wid, reason: lost.append((rid, wid, reason))
        try:
            cluster.control.expire_silent(104.0)
            assert w.state == "ready" and lost == []
            cluster.control.expire_silent(106.0)
            cluster.control.expire_silent(107.0)  # already dead: not counted twice
        finally:
            await cluster.stop()
        assert w.state == "dead"
        assert lost == [("a", "p", "worker p stopped responding")]
        assert metrics.registry.get_sample_value("baton:worker_losses_total") == 1

    asyncio.run(main())


def test_a_step_longer_than_the_heartbeat_timeout_does_not_kill_the_worker(tiny_config_dir):
    """Heartbeats come from their own thread: a 2.5 s step under a 1 s timeout stays alive."""

    async def main():
        cluster = ZmqCluster(
            RouterConfig(mode="colocated", heartbeat_timeout_s=1.0), None, 512, "tiny"
        )
        cluster.start()
        w, t = start_worker(cluster.endpoint, tiny_config_dir, "both", "slow")
        step = w.engine.step

        def slow_step():
            time.sleep(2.5)  # releases the GIL, as a long torch op does
            return step()

        w.engine.step = slow_step
        try:
            await wait_for(lambda: cluster.health()[0])
            params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
            tokens, finish = await collect(cluster, "r", PROMPTS[0], params)
            assert len(tokens) == 2 and finish == "length"
            assert cluster.pool.workers["slow"].state == "ready"
        finally:
            w.alive = False
            t.join(timeout=10)
            await cluster.stop()

    asyncio.run(main())
