"""The KV link of a worker: shipping a prompt's KV blocks to a decode worker (`KVSender`, prefill
side) and taking them in (`KVReceiver`, decode side), with the stall timeout on both.

Both drive the engine's `handoffs` (what is in flight, and when its blocks are freed) and tell the
router how things went through the callbacks they are given; they own only their sockets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from baton.server.engine import LLMEngine
from baton.server.handoffs import Outgoing
from baton.server.wire import codec
from baton.server.wire import messages as m
from baton.server.wire.kv_blocks import block_frames, frames_checksum, write_blocks
from baton.server.wire.logprobs import logprob_from_wire, logprob_to_wire
from baton.server.wire.params import params_from_dict

logger = logging.getLogger(__name__)

CHUNK_BLOCKS = 64  # blocks per KVChunk message
# NOTE: a DEALER to a decode worker that left (killed, scaled down, rolled) would stay open,
# reconnecting every 100 ms, for as long as this worker ran; one with no handoff for this long
# is closed (and opened again on its next use).
PEER_IDLE_S = 60.0

SendCtrl = Callable[[object], None]  # a message to the router
Fail = Callable[..., None]  # (request_id, error, retry=...): the request failed here


class KVSender:
    """Prefill side: one DEALER per decode worker, opened on first use."""

    def __init__(
        self,
        engine: LLMEngine,
        connect: Callable[[str], zmq.Socket],
        poller: zmq.Poller,
        send_ctrl: SendCtrl,
        fail: Fail,
        worker_id: str,
        timeout_s: float,
    ) -> None:
        self.engine = engine
        self.handoffs = engine.handoffs
        self._connect = connect
        self._poller = poller
        self._send_ctrl = send_ctrl
        self._fail = fail
        self._worker_id = worker_id
        self._timeout_s = timeout_s
        self.peers: dict[str, zmq.Socket] = {}  # decode endpoint -> DEALER
        self._peer_used: dict[str, float] = {}  # decode endpoint -> when last sent to

    def open(self, request_id: str, endpoint: str, prompt_token_ids: list[int], params) -> None:
        """Ask the decode worker at `endpoint` to take the KV of a request just added."""
        out = self.handoffs.outgoing(request_id)
        assert out is not None, "add the request with handoff first"
        out.endpoint, out.last_activity = endpoint, time.monotonic()
        self._send(
            endpoint,
            m.KVOpen(
                request_id=request_id,
                prefill_worker_id=self._worker_id,
                prompt_token_ids=list(prompt_token_ids),
                params=params,
                layout=self.engine.kv_layout,
            ),
        )

    def abort(self, request_id: str, reason: str) -> bool:
        """End an outgoing handoff here (its blocks freed) and tell the decode worker."""
        out = self.handoffs.outgoing(request_id)
        if out is None:
            return False
        self.handoffs.pop(request_id)
        self._send(out.endpoint, m.KVAbort(request_id=request_id, reason=reason))
        return True

    def close(self) -> None:
        for sock in self.peers.values():
            sock.close(0)

    def _send(self, endpoint: str, msg, payload=()) -> None:
        sock = self.peers.get(endpoint)
        if sock is None:
            sock = self._connect(endpoint)
            self.peers[endpoint] = sock
            self._poller.register(sock, zmq.POLLIN)
        self._peer_used[endpoint] = time.monotonic()
        sock.send_multipart(codec.encode(msg, payload), copy=False)

    def on_frames(self, frames) -> None:
        """A decode worker's answer: opened or refused, acknowledged, or aborted."""
        try:
            msg, _ = codec.decode(frames)
        except codec.WireError as e:
            logger.warning("dropped a malformed frame from a decode worker: %s", e)
            return
        out = self.handoffs.outgoing(msg.request_id) if hasattr(msg, "request_id") else None
        if out is None:
            return  # late answer for a request that ended
        out.last_activity = time.monotonic()
        rid = msg.request_id
        if isinstance(msg, m.KVOpenReply):
            out.opened = msg.ok
            out.shipped = out.skipped = msg.cached_blocks  # the decode worker holds those
            if not msg.ok:
                self._end(out, ok=False)
                self._fail(rid, f"decode worker refused the KV: {msg.reason}", retry=True)
        elif isinstance(msg, m.KVAck):
            self._end(out, ok=msg.ok)
            if not msg.ok:
                self._fail(rid, f"KV handoff failed: {msg.reason}", retry=True)
        elif isinstance(msg, m.KVAbort):
            self._end(out, ok=False)
            self._fail(rid, f"decode worker aborted the handoff: {msg.reason}", retry=True)

    def _end(self, out: Outgoing, ok: bool) -> None:
        """The handoff is over: free what it holds (a prompt still running is aborted), and tell
        the router the bytes shipped and the time from the first chunk."""
        self.handoffs.pop(out.request_id)
        if not ok:
            self.engine.abort_request(out.request_id)
        seconds = time.monotonic() - out.first_sent if out.first_sent is not None else 0.0
        skipped = out.skipped * self.engine.kv_cache[0].nbytes
        report = m.KVReport(
            request_id=out.request_id,
            nbytes=out.bytes_sent,
            seconds=seconds,
            ok=ok,
            skipped_nbytes=skipped,
        )
        self._send_ctrl(report)

    def ship_ready_blocks(self) -> None:
        """Ship complete blocks of every opened handoff; finish the ones whose prompt is done."""
        for out in self.handoffs.all_outgoing():
            if not out.opened or out.done_sent:
                continue
            progress = self.engine.handoffs.progress(out.request_id)
            if progress is None:
                continue
            blocks, ready = progress
            while out.shipped < ready:
                n = min(CHUNK_BLOCKS, ready - out.shipped)
                self._ship(out, blocks[out.shipped : out.shipped + n], out.shipped)
                out.shipped += n
            h = out.handoff
            if h is not None:
                self._send(
                    out.endpoint,
                    m.KVDone(
                        request_id=h.request_id,
                        num_blocks=len(h.block_ids),
                        first_token=h.first_token,
                        first_logprobs=(
                            logprob_to_wire(h.first_logprobs) if h.first_logprobs else None
                        ),
                        num_cached_tokens=h.num_cached_tokens,
                    ),
                )
                out.done_sent = True
                out.last_activity = time.monotonic()

    def _ship(self, out: Outgoing, block_ids: list[int], first: int) -> None:
        cache = self.engine.kv_cache
        frames = block_frames(cache, block_ids)
        nbytes = sum(f.nbytes for f in frames)
        header = m.KVChunk(
            request_id=out.request_id,
            first_block=first,
            num_blocks=len(block_ids),
            block_shape=list(cache.shape[1:]),
            dtype=self.engine.kv_layout.dtype,
            nbytes=nbytes,
            checksum=frames_checksum(frames),
        )
        if out.first_sent is None:
            out.first_sent = time.monotonic()
        self._send(out.endpoint, header, frames)
        out.bytes_sent += nbytes

    def expire(self, now: float) -> None:
        """Give up on handoffs whose decode worker said nothing for the timeout (dead, hung)."""
        limit = self._timeout_s
        for out in self.handoffs.all_outgoing():
            if out.waiting_on_peer and now - out.last_activity > limit:
                rid = out.request_id
                self._send(out.endpoint, m.KVAbort(request_id=rid, reason="timed out"))
                self._end(out, ok=False)  # still prefilling, or handed off: freed
                self._fail(rid, f"KV handoff timed out after {limit:g} s", retry=True)
        self._close_idle_peers(now)

    def _close_idle_peers(self, now: float) -> None:
        busy = {out.endpoint for out in self.handoffs.all_outgoing()}
        for endpoint, used in list(self._peer_used.items()):
            if endpoint not in busy and now - used > PEER_IDLE_S:
                sock = self.peers.pop(endpoint)
                del self._peer_used[endpoint]
                self._poller.unregister(sock)
                sock.close(0)


class KVReceiver:
    """Decode side: one ROUTER socket that every prefill worker's DEALER connects to."""

    def __init__(
        self,
        engine: LLMEngine,
        sock: zmq.Socket,
        send_ctrl: SendCtrl,
        draining: Callable[[], bool],
        worker_id: str,
        timeout_s: float,
    ) -> None:
        self.engine = engine
        self.handoffs = engine.handoffs
        self.sock = sock
        self._send_ctrl = send_ctrl
        self._draining = draining
        self._worker_id = worker_id
        self._timeout_s = timeout_s

    def abort(self, request_id: str, reason: str) -> bool:
        """End an incoming handoff here (its reservation freed) and tell the prefill worker."""
        inc = self.handoffs.incoming(request_id)
        if inc is None:
            return False
        self.handoffs.pop(request_id)
        self._send(inc.peer, m.KVAbort(request_id=request_id, reason=reason))
        return True

    def _send(self, peer: bytes, msg) -> None:
        self.sock.send_multipart([peer, *codec.encode(msg)], copy=False)

    def on_frames(self, frames) -> None:
        """One message from a prefill worker: open, a chunk of blocks, done, or abort."""
        peer = bytes(frames[0].buffer) if hasattr(frames[0], "buffer") else bytes(frames[0])
        try:
            msg, payload = codec.decode(frames[1:])
        except codec.WireError as e:
            logger.warning("dropped a malformed KV frame: %s", e)
            return
        try:
            self._on_message(peer, msg, payload)
        except ValueError as e:  # a chunk that does not fit what was reserved
            rid = msg.request_id
            logger.warning("KV handoff of %s failed: %s", rid, e)
            self.abort(rid, str(e))

    def _on_message(self, peer: bytes, msg, payload) -> None:
        if isinstance(msg, m.KVOpen):
            self._open(peer, msg)
            return
        inc = self.handoffs.incoming(getattr(msg, "request_id", ""))
        if inc is None or inc.peer != peer:
            logger.warning("dropped a %s for an unknown handoff", type(msg).__name__)
            return
        if isinstance(msg, m.KVChunk):
            end = msg.first_block + msg.num_blocks
            if msg.first_block < 0 or end > len(inc.block_ids):
                raise ValueError(f"blocks {msg.first_block}..{end} outside the reservation")
            if frames_checksum(payload) != msg.checksum:
                raise ValueError("KV chunk checksum mismatch")
            write_blocks(
                self.engine.kv_cache,
                inc.block_ids[msg.first_block : end],
                payload,
                msg.block_shape,
                msg.dtype,
            )
            inc.received.update(range(msg.first_block, end))
            inc.last_activity = time.monotonic()
        elif isinstance(msg, m.KVDone):
            if msg.num_blocks != len(inc.block_ids) or not inc.complete:
                raise ValueError(
                    f"KV incomplete: {len(inc.received)} of {len(inc.block_ids)} blocks arrived"
                )
            self._commit(peer, msg)
        elif isinstance(msg, m.KVAbort):
            self.handoffs.pop(msg.request_id)
        else:
            logger.warning("dropped an unexpected %s on the KV socket", type(msg).__name__)

    def _open(self, peer: bytes, msg: m.KVOpen) -> None:
        rid = msg.request_id
        if self._draining():
            self._refuse(peer, rid, "draining")
            return
        try:
            params = params_from_dict(msg.params)
            if msg.layout != self.engine.kv_layout:
                raise ValueError("KV layout differs from this worker's")
            dst = self.engine.reserve_prefilled(rid, msg.prompt_token_ids, params, peer)
        except ValueError as e:
            self._refuse(peer, rid, str(e))
            return
        if dst is None:
            self._refuse(peer, rid, "no free KV blocks right now")
            return
        inc = self.handoffs.incoming(rid)
        assert inc is not None
        inc.last_activity = time.monotonic()
        reply = m.KVOpenReply(request_id=rid, ok=True, reason="", cached_blocks=inc.num_cached)
        self._send(peer, reply)

    def _refuse(self, peer: bytes, request_id: str, reason: str) -> None:
        self._send(peer, m.KVOpenReply(request_id=request_id, ok=False, reason=reason))

    def _commit(self, peer: bytes, msg: m.KVDone) -> None:
        lps = msg.first_logprobs
        first_lp = logprob_from_wire(lps) if lps else None
        done = self.engine.commit_prefilled(
            msg.request_id, msg.first_token, first_lp, msg.num_cached_tokens
        )
        self._send(peer, m.KVAck(request_id=msg.request_id, ok=True, reason=""))
        if done is not None:  # the first token already ended it (e.g. max_tokens)
            c = done.outputs[0]
            self._send_ctrl(
                m.TokenOutput(
                    request_id=msg.request_id,
                    worker_id=self._worker_id,
                    token_ids=[],
                    logprobs=None,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason if isinstance(c.stop_reason, int) else None,
                    num_cached_tokens=msg.num_cached_tokens,
                )
            )

    def expire(self, now: float) -> None:
        """Drop reservations whose prefill worker sent nothing for the timeout."""
        limit = self._timeout_s
        for inc in self.handoffs.all_incoming():
            if now - inc.last_activity > limit:
                logger.warning("KV handoff of %s stalled for %g s; dropped", inc.request_id, limit)
                self.abort(inc.request_id, "timed out")
