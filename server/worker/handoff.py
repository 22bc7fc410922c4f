"""The two ends of a KV handoff, as state the worker loop drives (no sockets here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from baton.server.engine import Handoff


@dataclass
class Outgoing:
    """Prefill side: a prompt whose KV goes to `endpoint` once the decode worker said yes."""

    request_id: str
    endpoint: str
    opened: bool | None = None  # None until KVOpenReply
    shipped: int = 0  # leading blocks already sent
    handoff: Handoff | None = None  # set once the prompt is done
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
    block_ids: list[int]
    received: set[int] = field(default_factory=set)
    last_activity: float = 0.0

    @property
    def complete(self) -> bool:
        return len(self.received) == len(self.block_ids)
