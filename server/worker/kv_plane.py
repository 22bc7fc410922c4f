"""The KV plane of a worker: shipping a prompt's KV blocks to a decode worker (prefill side) and
taking them in (decode side), with the stall timeout on both.

A mixin of `Worker`, kept apart so each file holds one link: it uses the worker's engine, its
`outgoing`/`incoming` handoffs, its `peers` sockets and `kv` socket, and `_client`, `_fail`,
`_send_ctrl` for the router.
"""

from __future__ import annotations

import logging
import time

import zmq

from baton.server.wire import codec
from baton.server.wire import messages as m
from baton.server.wire.kv_blocks import block_frames, frames_checksum, layout_of, write_blocks
from baton.server.worker.handoff import Incoming, Outgoing

logger = logging.getLogger(__name__)

CHUNK_BLOCKS = 64  # blocks per KVChunk message


def _logprob_to_wire(entry) -> list:
    """(token, logprob, [(token, logprob), ...]) as msgpack-native lists."""
    token, logprob, top = entry
    return [token, logprob, [list(x) for x in top]]


def _logprob_from_wire(entry) -> tuple:
    token, logprob, top = entry
    return (token, logprob, [tuple(x) for x in top])


class KVPlane:
    # ---- KV plane, prefill side -----------------------------------------------------------

    def _send_peer(self, endpoint: str, msg, payload=()) -> None:
        sock = self.peers.get(endpoint)
        if sock is None:
            sock = self._client(endpoint)
            self.peers[endpoint] = sock
            self.poller.register(sock, zmq.POLLIN)
        sock.send_multipart(codec.encode(msg, payload), copy=False)

    def _on_peer(self, frames) -> None:
        try:
            msg, _ = codec.decode(frames)
        except codec.WireError as e:
            logger.warning("dropped a malformed frame from a decode worker: %s", e)
            return
        out = self.outgoing.get(msg.request_id) if hasattr(msg, "request_id") else None
        if out is None:
            return  # late answer for a request that ended
        out.last_activity = time.monotonic()
        if isinstance(msg, m.KVOpenReply):
            out.opened = msg.ok
            if not msg.ok:
                self.outgoing.pop(msg.request_id)
                self.engine.abort_request(msg.request_id)
                self._report(out, ok=False)
                self._fail(
                    msg.request_id, f"decode worker refused the KV: {msg.reason}", retry=True
                )
        elif isinstance(msg, m.KVAck):
            self.outgoing.pop(msg.request_id)
            self.engine.release_handoff(msg.request_id)
            self._report(out, ok=msg.ok)
            if not msg.ok:
                self._fail(msg.request_id, f"KV handoff failed: {msg.reason}", retry=True)
        elif isinstance(msg, m.KVAbort):
            self.outgoing.pop(msg.request_id)
            self.engine.abort_request(msg.request_id)
            self._report(out, ok=False)
            self._fail(
                msg.request_id, f"decode worker aborted the handoff: {msg.reason}", retry=True
            )

    def _report(self, out: Outgoing, ok: bool) -> None:
        """Tell the router how a handoff ended: bytes shipped, first chunk to its end."""
        now = time.monotonic()
        seconds = now - out.first_sent if out.first_sent is not None else 0.0
        self._send_ctrl(
            m.KVReport(request_id=out.request_id, nbytes=out.bytes_sent, seconds=seconds, ok=ok)
        )

    def _pump(self) -> None:
        """Ship complete blocks of every opened handoff; finish the ones whose prompt is done."""
        for out in list(self.outgoing.values()):
            if not out.opened or out.done_sent:
                continue
            if out.handoff is not None:
                blocks, ready = out.handoff.block_ids, len(out.handoff.block_ids)
            else:
                progress = self.engine.prefill_progress(out.request_id)
                if progress is None:
                    continue
                blocks, ready = progress
            while out.shipped < ready:
                n = min(CHUNK_BLOCKS, ready - out.shipped)
                self._ship(out, blocks[out.shipped : out.shipped + n], out.shipped)
                out.shipped += n
            h = out.handoff
            if h is not None:
                self._send_peer(
                    out.endpoint,
                    m.KVDone(
                        request_id=h.request_id,
                        num_blocks=len(h.block_ids),
                        first_token=h.first_token,
                        first_logprobs=(
                            _logprob_to_wire(h.first_logprobs) if h.first_logprobs else None
                        ),
                        num_cached_tokens=h.num_cached_tokens,
                    ),
                )
                out.done_sent = True
                out.last_activity = time.monotonic()

    def _ship(self, out: Outgoing, block_ids: list[int], first: int) -> None:
        cache = self.engine.runner.kv_cache
        frames = block_frames(cache, block_ids)
        nbytes = sum(f.nbytes for f in frames)
        header = m.KVChunk(
            request_id=out.request_id,
            first_block=first,
            num_blocks=len(block_ids),
            block_shape=list(cache.shape[1:]),
            dtype=layout_of(cache).dtype,
            nbytes=nbytes,
            checksum=frames_checksum(frames),
        )
        if out.first_sent is None:
            out.first_sent = time.monotonic()
        self._send_peer(out.endpoint, header, frames)
        out.bytes_sent += nbytes

    # ---- KV plane, decode side ------------------------------------------------------------

    def _send_kv(self, peer: bytes, msg) -> None:
        assert self.kv is not None
        self.kv.send_multipart([peer, *codec.encode(msg)], copy=False)

    def _on_kv_frames(self, frames) -> None:
        peer = bytes(frames[0].buffer) if hasattr(frames[0], "buffer") else bytes(frames[0])
        try:
            msg, payload = codec.decode(frames[1:])
        except codec.WireError as e:
            logger.warning("dropped a malformed KV frame: %s", e)
            return
        try:
            self._on_kv(peer, msg, payload)
        except ValueError as e:  # a chunk that does not fit what was reserved
            rid = msg.request_id
            logger.warning("KV handoff of %s failed: %s", rid, e)
            if self.incoming.pop(rid, None) is not None:
                self.engine.abort_request(rid)
                self._send_kv(peer, m.KVAbort(request_id=rid, reason=str(e)))

    def _on_kv(self, peer: bytes, msg, payload) -> None:
        if isinstance(msg, m.KVOpen):
            if self.draining:
                self._refuse_kv(peer, msg.request_id, "draining")
                return
            try:
                params = m.params_from_dict(msg.params)
                if msg.layout != layout_of(self.engine.runner.kv_cache):
                    raise ValueError("KV layout differs from this worker's")
                dst = self.engine.reserve_prefilled(msg.request_id, msg.prompt_token_ids, params)
            except ValueError as e:
                self._refuse_kv(peer, msg.request_id, str(e))
                return
            if dst is None:
                self._refuse_kv(peer, msg.request_id, "no free KV blocks right now")
                return
            self.incoming[msg.request_id] = Incoming(
                msg.request_id, peer, dst, last_activity=time.monotonic()
            )
            self._send_kv(peer, m.KVOpenReply(request_id=msg.request_id, ok=True, reason=""))
            return
        inc = self.incoming.get(getattr(msg, "request_id", ""))
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
                self.engine.runner.kv_cache,
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
            del self.incoming[msg.request_id]
            lps = msg.first_logprobs
            first_lp = _logprob_from_wire(lps) if lps else None
            done = self.engine.commit_prefilled(msg.request_id, msg.first_token, first_lp)
            self._send_kv(peer, m.KVAck(request_id=msg.request_id, ok=True, reason=""))
            if done is not None:  # the first token already ended it (e.g. max_tokens)
                c = done.outputs[0]
                self._send_ctrl(
                    m.TokenOutput(
                        request_id=msg.request_id,
                        worker_id=self.id,
                        token_ids=[],
                        logprobs=None,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason if isinstance(c.stop_reason, int) else None,
                        num_cached_tokens=msg.num_cached_tokens,
                    )
                )
        elif isinstance(msg, m.KVAbort):
            del self.incoming[msg.request_id]
            self.engine.abort_request(msg.request_id)
        else:
            logger.warning("dropped an unexpected %s on the KV socket", type(msg).__name__)

    def _refuse_kv(self, peer: bytes, request_id: str, reason: str) -> None:
        self._send_kv(peer, m.KVOpenReply(request_id=request_id, ok=False, reason=reason))

    # ---- handoffs that stall ------------------------------------------------------------------

    def _expire_handoffs(self, now: float) -> None:
        """Give up on handoffs with no progress for kv_timeout_s (a peer died or hangs)."""
        limit = self.config.kv_timeout_s
        for rid, out in list(self.outgoing.items()):
            if out.waiting_on_peer and now - out.last_activity > limit:
                self.outgoing.pop(rid)
                self._send_peer(out.endpoint, m.KVAbort(request_id=rid, reason="timed out"))
                self.engine.abort_request(rid)  # still prefilling, or handed off: freed
                self._report(out, ok=False)
                self._fail(rid, f"KV handoff timed out after {limit:g} s", retry=True)
        for rid, inc in list(self.incoming.items()):
            if now - inc.last_activity > limit:
                logger.warning("KV handoff of %s stalled for %g s; dropped", rid, limit)
                self.incoming.pop(rid)
                self.engine.abort_request(rid)
                self._send_kv(inc.peer, m.KVAbort(request_id=rid, reason="timed out"))
