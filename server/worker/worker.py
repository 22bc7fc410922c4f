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

import torch
import zmq

from baton.server.engine import LLMEngine
from baton.server.host_cpu import format_cpu_list, usable_cpus
from baton.server.outputs import RequestOutput
from baton.server.wire import codec, curve
from baton.server.wire import messages as m
from baton.server.wire.kv_blocks import layout_of
from baton.server.worker.config import WorkerConfig
from baton.server.worker.handoff import Incoming, Outgoing
from baton.server.worker.health import HealthServer
from baton.server.worker.kv_plane import KVPlane, _logprob_to_wire

logger = logging.getLogger(__name__)

# NOTE: with nothing to run, the loop wakes this often for its timers (handoff stalls, the
# parent check); messages wake it at once. Idle, a worker then uses ~0.1% of a core.
IDLE_POLL_MS = 100


class RegistrationError(RuntimeError):
    """The router refused this worker, or never answered its registration."""


class Worker(KVPlane):
    def __init__(self, config: WorkerConfig, engine: LLMEngine | None = None) -> None:
        self.config = config
        self.id = config.worker_id
        self.engine = engine or LLMEngine(config.engine)
        self.ctx = zmq.Context()
        self.auth = None  # the ZAP handler of the KV socket, when it is a CURVE server
        self.ctrl = self._client(config.router, self.id.encode())
        self.poller = zmq.Poller()
        self.poller.register(self.ctrl, zmq.POLLIN)
        self.kv: zmq.Socket | None = None
        self.kv_endpoint = ""
        if config.role in ("decode", "both"):
            self.auth = curve.start_authenticator(self.ctx, config.curve)
            self.kv = self.ctx.socket(zmq.ROUTER)
            self.kv.setsockopt(zmq.LINGER, 0)
            curve.secure_server(self.kv, config.curve)
            port = config.kv_port or self.kv.bind_to_random_port(f"tcp://{config.kv_host}")
            if config.kv_port:
                self.kv.bind(f"tcp://{config.kv_host}:{port}")
            self.kv_endpoint = f"tcp://{config.kv_host}:{port}"
            self.poller.register(self.kv, zmq.POLLIN)
        self.peers: dict[str, zmq.Socket] = {}  # decode endpoint -> DEALER (prefill side)
        self.outgoing: dict[str, Outgoing] = {}
        self.incoming: dict[str, Incoming] = {}
        self.running = True
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
        eng = self.engine
        msg = m.Register(
            worker_id=self.id,
            role=self.config.role,
            pid=os.getpid(),
            host=self.config.kv_host,
            model=eng.model_name,
            layout=layout_of(eng.runner.kv_cache),
            kv_endpoint=self.kv_endpoint,
            max_model_len=eng.max_model_len,
            num_blocks=eng.cache_config.num_blocks,
            cpu=self._cpu(),
        )
        self.ctrl.send_multipart(codec.encode(msg), copy=False)
        deadline = time.monotonic() + self.config.register_timeout_s
        while time.monotonic() < deadline:
            if not self.ctrl.poll(200):
                continue
            frames = self.ctrl.recv_multipart(copy=False)
            try:
                reply, _ = codec.decode(frames)
            except codec.WireError as e:
                self._check_router_version(frames)
                logger.warning("dropped a malformed frame from the router: %s", e)
                continue
            if isinstance(reply, m.RegisterReply):
                if not reply.accepted:
                    raise RegistrationError(f"the router refused this worker: {reply.reason}")
                logger.info("worker %s registered as %s", self.id, self.config.role)
                self.registered = True
                return
        raise RegistrationError(f"no answer from the router at {self.config.router}")

    @staticmethod
    def _check_router_version(frames) -> None:
        """A router of another protocol version answers a Register in its own version (one that
        knows this worker's answers in this worker's): stop with both versions named."""
        try:
            name, version = codec.peek(frames)
        except codec.WireError:
            return
        if name == m.RegisterReply.TYPE and version != codec.PROTOCOL_VERSION:
            raise RegistrationError(
                f"the router speaks protocol version {version}, this worker "
                f"{codec.PROTOCOL_VERSION}: run the same Baton version on both"
            )

    def _cpu(self) -> m.WorkerCPU | None:
        if self.engine.device.type != "cpu":
            return None
        plan = self.config.threads
        return m.WorkerCPU(
            threads=torch.get_num_threads(),
            wait_policy=plan.wait_policy if plan is not None else "torch's default",
            cpus=format_cpu_list(plan.cpus if plan is not None else usable_cpus()),
            linear=self.engine.runner.cpu_linear,
        )

    def run(self) -> None:
        beats = threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True)
        if self.health is not None:
            self.health.start()
        try:
            self.register()
            beats.start()
            while self.running:
                self.run_once()
                if self.draining and (self._idle() or time.monotonic() > self.drain_deadline):
                    self._give_back_all("the worker stopped before finishing it")
                    self.running = False
        finally:
            self.running = False
            self._stop_beats.set()
            if beats.is_alive():
                beats.join(timeout=5)
            if self.registered:
                reason = "drained" if self.draining else "stopped"
                with contextlib.suppress(zmq.ZMQError):
                    self._send_ctrl(m.Deregister(worker_id=self.id, reason=reason))
            self.close()

    def _idle(self) -> bool:
        return not (self.engine.has_unfinished_requests() or self.outgoing or self.incoming)

    def _give_back_all(self, reason: str) -> None:
        """Drop every request here; the router resumes each elsewhere."""
        for rid in self.engine.abort_all():
            self._fail(rid, reason, retry=True)
        for rid in list(self.outgoing):
            self._abort(rid)
        for rid in list(self.incoming):
            self._abort(rid)

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
        for sock in [self.ctrl, self.kv, *self.peers.values()]:
            if sock is not None:
                sock.close(0)
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
            self._drain(self.ctrl, self._on_control)
        if self.kv is not None and self.kv in events:
            self._drain(self.kv, self._on_kv_frames)
        for sock in self.peers.values():
            if sock in events:
                self._drain(sock, self._on_peer)
        if self.engine.has_unfinished_requests():
            outs = self.engine.step()
            self._publish(outs)
            for h in self.engine.take_handoffs():
                if h.request_id in self.outgoing:
                    self.outgoing[h.request_id].handoff = h
                else:  # its decode side is gone: nothing to ship
                    self.engine.release_handoff(h.request_id)
        self._pump()
        now = time.monotonic()
        if now - self._last_timeout_check >= min(1.0, self.config.kv_timeout_s / 4):
            self._last_timeout_check = now
            self._expire_handoffs(now)
        if now - self._last_parent_check >= self.config.heartbeat_s:
            self._last_parent_check = now
            if self.config.parent_pid and os.getppid() != self.config.parent_pid:
                logger.error("the process that started this worker is gone; stopping")
                self.running = False

    def _drain(self, sock: zmq.Socket, handler) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handler(frames)

    # ---- control plane (router) -----------------------------------------------------------

    def _send_ctrl(self, msg) -> None:
        self.ctrl.send_multipart(codec.encode(msg), copy=False)

    def _fail(self, request_id: str, error: str, retry: bool = False) -> None:
        """Tell the router the request ended here with `error`; with `retry` the fault was this
        worker's (or its handoff's), not the request's, and the router may run it elsewhere."""
        logger.warning("request %s failed: %s", request_id, error)
        self._send_ctrl(
            m.RequestFailed(request_id=request_id, worker_id=self.id, error=error, retry=retry)
        )

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
            for rid in self.engine.abort_all():
                logger.info("dropped request %s of the router's earlier session", rid)
            for rid in list(self.outgoing) + list(self.incoming):
                self._abort(rid)
            self.register()
            if self.draining:
                self._beat_now.set()
        elif isinstance(msg, m.RegisterReply) and not msg.accepted:
            logger.error("the router dropped this worker: %s", msg.reason)
            self.running = False
        else:
            logger.warning("dropped an unexpected %s from the router", type(msg).__name__)

    def _on_generate(self, msg: m.Generate) -> None:
        if self.draining:
            self._fail(msg.request_id, f"worker {self.id} is draining", retry=True)
            return
        handoff = bool(msg.decode_endpoint)
        try:
            params = m.params_from_dict(msg.params)
            self.engine.add_request(
                msg.request_id,
                msg.prompt_token_ids,
                params,
                handoff=handoff,
                prior_output_ids=msg.prior_output_ids,
            )
        except ValueError as e:
            self._fail(msg.request_id, str(e))
            return
        if handoff:
            out = Outgoing(msg.request_id, msg.decode_endpoint, last_activity=time.monotonic())
            self.outgoing[msg.request_id] = out
            self._send_peer(
                out.endpoint,
                m.KVOpen(
                    request_id=msg.request_id,
                    prefill_worker_id=self.id,
                    prompt_token_ids=list(msg.prompt_token_ids),
                    params=msg.params,
                    layout=layout_of(self.engine.runner.kv_cache),
                ),
            )

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        out = self.outgoing.pop(request_id, None)
        if out is not None:
            self._send_peer(out.endpoint, m.KVAbort(request_id=request_id, reason="aborted"))
            self.engine.release_handoff(request_id)
        inc = self.incoming.pop(request_id, None)
        if inc is not None and self.kv is not None:
            self._send_kv(inc.peer, m.KVAbort(request_id=request_id, reason="aborted"))

    def _publish(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            c = out.outputs[0]
            n = len(c.token_ids_delta)
            lps = None
            if c.logprobs:
                lps = [_logprob_to_wire(e) for e in c.logprobs[len(c.logprobs) - n :]]
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
            if out.finished and out.request_id in self.outgoing:
                ended = self.outgoing.pop(out.request_id)  # the first token ended it
                self._send_peer(
                    ended.endpoint, m.KVAbort(request_id=out.request_id, reason="finished")
                )

    def _heartbeat(self) -> m.Heartbeat:
        # NOTE: read from the heartbeat thread while the loop runs: plain counters, a snapshot
        # that may be a step old, which is all a load estimate needs.
        b = self.engine.batcher
        bm = b.block_manager
        return m.Heartbeat(
            worker_id=self.id,
            running=b.num_running + len(self.outgoing),
            waiting=b.num_waiting + len(self.incoming),
            kv_usage=float(bm.usage),
            num_free_blocks=bm.num_free_blocks,
            prefix_queries=bm.prefix_queries,
            prefix_hits=bm.prefix_hits,
            draining=self.draining,
        )
