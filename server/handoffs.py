"""Requests whose KV crosses workers, both directions, and when their blocks are freed.

The engine owns one `Handoffs`; the worker's KV link drives it. One dict holds every handoff:

- `Outgoing` (prefill side): created by `LLMEngine.add_request(handoff=True)`. While the prompt is
  computed its blocks belong to the batch; once its first token is sampled (`prompt_done`) the
  sequence leaves the batch and is held here, with its blocks, until the handoff ends.
- `Incoming` (decode side): created by `LLMEngine.reserve_prefilled`, which allocates the blocks
  the KV is written into and holds the sequence here; `commit` puts it in the batch.

NOTE: blocks held outside the batch are freed in exactly two places here: `pop` (the receiver
acknowledged, refused or aborted, the handoff stalled, the request was aborted) and
`prompt_done` when the handoff already ended while the prompt ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from baton.scheduler.batcher import Batcher
from baton.scheduler.sequence import Sequence


@dataclass(frozen=True)
class Handoff:
    """A prompt computed here whose KV (in `block_ids`) goes to a decode worker."""

    request_id: str
    block_ids: list[int]
    num_prompt_tokens: int
    first_token: int
    first_logprobs: tuple | None
    num_cached_tokens: int


@dataclass
class Outgoing:
    """Prefill side: a prompt whose KV goes to `endpoint` once the decode worker said yes."""

    request_id: str
    endpoint: str = ""
    opened: bool | None = None  # None until KVOpenReply
    shipped: int = 0  # leading blocks already sent (or held by the decode worker)
    skipped: int = 0  # leading blocks the decode worker held: not sent
    handoff: Handoff | None = None  # set once the prompt is done
    detached: Sequence | None = None  # the prompt's sequence, out of the batch, with its blocks
    done_sent: bool = False
    bytes_sent: int = 0
    first_sent: float | None = None  # when the first chunk went out
    last_activity: float = 0.0  # the last message either way (for the stall timeout)

    @property
    def waiting_on_peer(self) -> bool:
        """Waiting for the decode worker's answer (not for this worker's own engine)."""
        return self.opened is None or self.done_sent


@dataclass
class Incoming:
    """Decode side: blocks reserved for a prompt computed on `peer` (its socket identity)."""

    request_id: str
    peer: bytes
    seq: Sequence  # outside the batch, holding the reserved blocks
    block_ids: list[int]
    received: set[int] = field(default_factory=set)
    last_activity: float = 0.0
    num_cached: int = 0  # leading blocks this worker's cache held already: never shipped

    @property
    def complete(self) -> bool:
        return len(self.received) == len(self.block_ids)


class Handoffs:
    def __init__(self, batcher: Batcher, block_size: int) -> None:
        self._batcher, self._block_size = batcher, block_size
        self._all: dict[str, Outgoing | Incoming] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._all

    def __len__(self) -> int:
        return len(self._all)

    def ids(self) -> list[str]:
        return list(self._all)

    # NOTE: the heartbeat thread reads these two while the loop runs: `list()` of a dict's values
    # is one step under the GIL, and a count a step old is all a load estimate needs.
    @property
    def num_outgoing(self) -> int:
        return sum(isinstance(h, Outgoing) for h in list(self._all.values()))

    @property
    def num_incoming(self) -> int:
        return sum(isinstance(h, Incoming) for h in list(self._all.values()))

    def outgoing(self, request_id: str) -> Outgoing | None:
        h = self._all.get(request_id)
        return h if isinstance(h, Outgoing) else None

    def incoming(self, request_id: str) -> Incoming | None:
        h = self._all.get(request_id)
        return h if isinstance(h, Incoming) else None

    def all_outgoing(self) -> list[Outgoing]:
        return [h for h in self._all.values() if isinstance(h, Outgoing)]

    def all_incoming(self) -> list[Incoming]:
        return [h for h in self._all.values() if isinstance(h, Incoming)]

    def pop(self, request_id: str) -> Outgoing | Incoming | None:
        """End a handoff: forget it and free the blocks it holds outside the batch (a detached
        prompt, a reservation). A prompt still being computed keeps its blocks in the batch."""
        h = self._all.pop(request_id, None)
        if isinstance(h, Outgoing) and h.detached is not None:
            self._batcher.free(h.detached)
        elif isinstance(h, Incoming):
            self._batcher.free(h.seq)
        return h

    # ---- prefill side -------------------------------------------------------------------------

    def expect(self, request_id: str) -> None:
        """A request just added with handoff: its KV goes elsewhere once computed."""
        self._all[request_id] = Outgoing(request_id)

    def progress(self, request_id: str) -> tuple[list[int], int] | None:
        """(block table, number of leading blocks whose KV is complete) of an outgoing prompt, so
        its KV can be shipped before the prompt is done."""
        out = self.outgoing(request_id)
        if out is None:
            return None
        if out.handoff is not None:
            return out.handoff.block_ids, len(out.handoff.block_ids)
        seq = self._batcher.get(request_id)
        if seq is None:
            return None
        done = min(seq.num_computed_tokens, seq.num_prompt_tokens) // self._block_size
        return list(seq.block_table), done

    def prompt_done(self, seq: Sequence, first_logprobs: tuple | None) -> None:
        """The prompt's first token is sampled: the sequence leaves the batch, keeping its blocks
        for the handoff (or freeing them, if the handoff already ended)."""
        self._batcher.detach(seq.seq_id)
        out = self.outgoing(seq.seq_id)
        if out is None:  # its decode side is gone: nothing to ship
            self._batcher.free(seq)
            return
        out.detached = seq
        out.handoff = Handoff(
            request_id=seq.seq_id,
            block_ids=list(seq.block_table),
            num_prompt_tokens=seq.num_prompt_tokens,
            first_token=seq.output_token_ids[0],
            first_logprobs=first_logprobs,
            num_cached_tokens=seq.num_cached_tokens,
        )

    # ---- decode side --------------------------------------------------------------------------

    def reserve(self, seq: Sequence, peer: bytes) -> list[int] | None:
        """Allocate blocks for a prompt whose KV comes from `peer`. Returns the block ids to
        write, or None (holding nothing) when they are not free now; ValueError if it could never
        fit."""
        if seq.seq_id in self._all:
            raise ValueError(f"seq_id: {seq.seq_id!r} is already handed off")
        if not self._batcher.reserve(seq):
            return None
        cached = seq.num_cached_tokens // self._block_size
        inc = Incoming(seq.seq_id, peer, seq, list(seq.block_table), num_cached=cached)
        inc.received.update(range(cached))  # held here already: not shipped
        self._all[seq.seq_id] = inc
        return list(seq.block_table)

    def commit(self, request_id: str, first_token: int) -> Sequence:
        """The reserved prompt's KV is in place: the sequence joins the batch with its blocks."""
        h = self._all.pop(request_id)
        assert isinstance(h, Incoming), request_id
        return self._batcher.join(h.seq, first_token)
