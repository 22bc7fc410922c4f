"""The worker loop: registers with the router, runs engine steps, hands KV over ZeroMQ.

One thread, one poller (heartbeats have their own thread). Every frame goes through the wire
codec; a malformed one is logged and dropped, never fatal.

Stopping: `drain()` (SIGTERM) makes the worker take nothing new, finish what it has within
`drain_timeout_s`, give what is left back to the router (which resumes it elsewhere), deregister
and return from `run`. A KV handoff that makes no progress for `kv_timeout_s` is given up on
both sides, blocks freed, the request given back to the router.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import zmq

from baton.server.engine import LLMEngine
from baton.server.host_memory import rss_bytes
from baton.server.outputs import RequestOutput
from baton.server.wire import codec, curve
from baton.server.wire import messages as m
from baton.server.wire.logprobs import logprob_to_wire
from baton.server.wire.params import params_from_dict
from baton.server.worker.config import WorkerConfig
from baton.server.worker.health import HealthServer
from baton.server.worker.kv_events import KVEventPublisher
from baton.server.worker.kv_link import KVReceiver, KVSender
from baton.server.worker.registration import await_acceptance, register_message

logger = logging.getLogger(__name__)

# NOTE: with nothing to run, the loop wakes this often for its timers (handoff stalls, the
# parent check); messages wake it at once. Idle, a worker then uses ~0.1% of a core.
IDLE_POLL_MS = 100


class Worker:
    def __init__(self, config: WorkerConfig, engine: LLMEngine | None = None) -> None:
        self.config = config
        self.id = config.worker_id
        self.engine = engine or LLMEngine(config.engine)
        self.ctx = zmq.Context()
        self.auth = None  # the ZAP handler of the KV socket, when it is a CURVE server
        self.ctrl = self._client(config.router, self.id.encode())
        self.poller = zmq.Poller()
        self.poller.register(self.ctrl, zmq.POLLIN)
        self.sender = KVSender(
            self.engine,
            self._client,
            self.poller,
            self._send_ctrl,
            self._fail,
            self.id,
            config.kv_timeout_s,
        )
        self.receiver: KVReceiver | None = None
        self.kv_endpoint = ""
        if config.role in ("decode", "both"):
            self.auth = curve.start_authenticator(self.ctx, config.curve)
            kv = self.ctx.socket(zmq.ROUTER)
            kv.setsockopt(zmq.LINGER, 0)
            curve.secure_server(kv, config.curve)
            port = config.kv_port or kv.bind_to_random_port(f"tcp://{config.kv_host}")
            if config.kv_port:
                kv.bind(f"tcp://{config.kv_host}:{port}")
            self.kv_endpoint = f"tcp://{config.kv_host}:{port}"
            self.poller.register(kv, zmq.POLLIN)
            self.receiver = KVReceiver(
                self.engine,
                kv,
                self._send_ctrl,
                lambda: self.draining,
                self.id,
                config.kv_timeout_s,
            )
        self.kv_events = KVEventPublisher(
            self.engine.batcher.block_manager, self._send_ctrl, self.id
        )
        self.alive = True
        self.registered = False
        self.last_tick = time.monotonic()  # the loop's last turn (the liveness probe)
        self.health: HealthServer | None = None
        if config.health_port is not None:
            self.health = HealthServer(self, config.health_host, config.health_port, config.role)
        self.drain_deadline: float | None = None  # set by drain()
        self._last_parent_check = 0.0
        self._last_timeout_check = 0.0
        self._stop_beats = threading.Event()
        self._beat_now = threading.Event()

    def _client(self, endpoint: str, identity: bytes | None = None) -> zmq.Socket:
        """A DEALER connected to `endpoint`, presenting the deployment keys when CURVE is on."""
        sock = self.ctx.socket(zmq.DEALER)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        curve.secure_client(sock, self.config.curve)
        sock.connect(endpoint)
        return sock

    @property
    def draining(self) -> bool:
        return self.drain_deadline is not None

    def drain(self) -> None:
        """Stop taking work; finish (or give back) what is here, then leave. Signal-safe."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.config.drain_timeout_s
            self._beat_now.set()  # tell the router now, not at the next beat

    # ---- lifecycle ------------------------------------------------------------------------

    def register(self) -> None:
        msg = register_message(self.config, self.engine, self.kv_endpoint)
        self.ctrl.send_multipart(codec.encode(msg), copy=False)
        await_acceptance(self.ctrl, self.config)
        logger.info("worker %s registered as %s", self.id, self.config.role)
        self.registered = True
        self.kv_events.snapshot()

    def run(self) -> None:
        beats = threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True)
        if self.health is not None:
            self.health.start()
        try:
            self.register()
            beats.start()
            while self.alive:
                self.run_once()
                if self.draining and (self._idle() or time.monotonic() > self.drain_deadline):
                    self._give_back_all("the worker stopped before finishing it")
                    self.alive = False
        finally:
            self.alive = False
            self._stop_beats.set()
            if beats.is_alive():
                beats.join(timeout=5)
            if self.registered:
                reason = "drained" if self.draining else "stopped"
                with contextlib.suppress(zmq.ZMQError):
                    self._send_ctrl(m.Deregister(worker_id=self.id, reason=reason))
            self.close()

    def _idle(self) -> bool:
        return not (self.engine.has_unfinished_requests() or self.engine.handoffs)

    def _give_back_all(self, reason: str) -> None:
        """Drop every request here; the router resumes each elsewhere."""
        for rid in self._abort_all():
            self._fail(rid, reason, retry=True)

    def _abort_all(self) -> list[str]:
        """Abort every request, its KV peers told; returns their ids."""
        ids = self.engine.handoffs.ids()
        for rid in ids:
            self._abort_links(rid, "aborted")
        return list(dict.fromkeys([*ids, *self.engine.abort_all()]))

    def _beat_loop(self) -> None:
        """Heartbeats from their own thread and socket, so one long engine step (a big prefill
        chunk on a CPU) never looks like a dead worker. The router knows the socket by the
        `/beat` suffix of this worker's id."""
        sock = self._client(self.config.router, f"{self.id}/beat".encode())
        try:
            while not self._stop_beats.is_set():
                sock.send_multipart(codec.encode(self._heartbeat()), copy=False)
                self._beat_now.wait(self.config.heartbeat_s)
                self._beat_now.clear()
        finally:
            sock.close(0)

    def close(self) -> None:
        self.ctrl.setsockopt(zmq.LINGER, 1000)  # let a Deregister leave
        self.ctrl.close(0)
        if self.receiver is not None:
            self.receiver.sock.close(0)
        self.sender.close()
        if self.auth is not None:
            self.auth.stop()
        if self.health is not None:
            self.health.stop()
        self.ctx.term()

    def run_once(self) -> None:
        self.last_tick = time.monotonic()
        busy = self.engine.has_unfinished_requests()
        events = dict(self.poller.poll(0 if busy else IDLE_POLL_MS))
        if self.ctrl in events:
            self._read_all(self.ctrl, self._on_control)
        if self.receiver is not None and self.receiver.sock in events:
            self._read_all(self.receiver.sock, self.receiver.on_frames)
        for sock in list(self.sender.peers.values()):
            if sock in events:
                self._read_all(sock, self.sender.on_frames)
        if self.engine.has_unfinished_requests():
            self._publish(self.engine.step())
        self.kv_events.publish()
        self.sender.ship_ready_blocks()
        now = time.monotonic()
        if now - self._last_timeout_check >= min(1.0, self.config.kv_timeout_s / 4):
            self._last_timeout_check = now
            self.sender.expire(now)
            if self.receiver is not None:
                self.receiver.expire(now)
        if now - self._last_parent_check >= self.config.heartbeat_s:
            self._last_parent_check = now
            if self.config.parent_pid and os.getppid() != self.config.parent_pid:
                logger.error("the process that started this worker is gone; stopping")
                self.alive = False

    def _read_all(self, sock: zmq.Socket, handler) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handler(frames)

    # ---- control plane (router) -----------------------------------------------------------

    def _send_ctrl(self, msg) -> None:
        self.ctrl.send_multipart(codec.encode(msg), copy=False)

    def _fail(
        self, request_id: str, error: str, retry: bool = False, bad_request: bool = False
    ) -> None:
        """Tell the router the request ended here with `error`; with `retry` the fault was this
        worker's (or its handoff's), not the request's, and the router may run it elsewhere;
        with `bad_request` the request itself is invalid (the client gets a 400)."""
        logger.warning("request %s failed: %s", request_id, error)
        msg = m.RequestFailed(
            request_id=request_id,
            worker_id=self.id,
            error=error,
            retry=retry,
            bad_request=bad_request,
        )
        self._send_ctrl(msg)

    def _on_control(self, frames) -> None:
        try:
            msg, _ = codec.decode(frames)
        except codec.WireError as e:
            logger.warning("dropped a malformed frame from the router: %s", e)
            return
        if isinstance(msg, m.Generate):
            self._on_generate(msg)
        elif isinstance(msg, m.Abort):
            self._abort(msg.request_id)
        elif isinstance(msg, m.Reconnect):
            # The router restarted (or gave up on us): what we ran for it has no client left.
            logger.warning("router asks this worker to register again: %s", msg.reason)
            for rid in self._abort_all():
                logger.info("dropped request %s of the router's earlier session", rid)
            self.register()
            if self.draining:
                self._beat_now.set()
        elif isinstance(msg, m.KVResync):
            logger.info("router asks for a KV snapshot: %s", msg.reason)
            self.kv_events.snapshot()
        elif isinstance(msg, m.RegisterReply) and not msg.accepted:
            logger.error("the router dropped this worker: %s", msg.reason)
            self.alive = False
        else:
            logger.warning("dropped an unexpected %s from the router", type(msg).__name__)

    def _on_generate(self, msg: m.Generate) -> None:
        if self.draining:
            self._fail(msg.request_id, f"worker {self.id} is draining", retry=True)
            return
        handoff = bool(msg.decode_endpoint)
        try:
            params = params_from_dict(msg.params)
            self.engine.add_request(
                msg.request_id,
                msg.prompt_token_ids,
                params,
                handoff=handoff,
                prior_output_ids=msg.prior_output_ids,
            )
        except ValueError as e:  # the request's own fault (a grammar refused, a bad field)
            self._fail(msg.request_id, str(e), bad_request=True)
            return
        if handoff:
            self.sender.open(msg.request_id, msg.decode_endpoint, msg.prompt_token_ids, msg.params)

    def _abort(self, request_id: str) -> None:
        self._abort_links(request_id, "aborted")
        self.engine.abort_request(request_id)

    def _abort_links(self, request_id: str, reason: str) -> None:
        """End a request's handoff, if it has one, telling the worker at the other end."""
        if not self.sender.abort(request_id, reason) and self.receiver is not None:
            self.receiver.abort(request_id, reason)

    def _publish(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            c = out.outputs[0]
            n = len(c.token_ids_delta)
            lps = None
            if c.logprobs:
                lps = [logprob_to_wire(e) for e in c.logprobs[len(c.logprobs) - n :]]
            stop = c.stop_reason if isinstance(c.stop_reason, int) else None
            # the first output of a request this worker ran (not one it took over mid-way)
            first = len(c.token_ids) == n
            self._send_ctrl(
                m.TokenOutput(
                    request_id=out.request_id,
                    worker_id=self.id,
                    token_ids=list(c.token_ids_delta),
                    logprobs=lps,
                    finish_reason=c.finish_reason,
                    stop_reason=stop,
                    num_cached_tokens=out.num_cached_tokens or 0,
                    queue_time_s=out.queue_time if first else None,
                )
            )
            if out.finished:  # a handoff whose first token ended it: nothing to ship
                self.sender.abort(out.request_id, "finished")

    def _heartbeat(self) -> m.Heartbeat:
        # NOTE: read from the heartbeat thread while the loop runs: plain counters, a snapshot
        # that may be a step old, which is all a load estimate needs.
        s, h = self.engine.cache_stats, self.engine.handoffs
        return m.Heartbeat(
            worker_id=self.id,
            running=s.num_running + h.num_outgoing,
            waiting=s.num_waiting + h.num_incoming,
            kv_usage=s.usage,
            num_free_blocks=s.num_free_blocks,
            prefix_queries=s.prefix_queries,
            prefix_hits=s.prefix_hits,
            draining=self.draining,
            rss_bytes=rss_bytes(),
            kv_resident_bytes=self.engine.runner.kv_resident_bytes(),
        )
