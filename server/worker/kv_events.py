"""A worker's KV events: what its prefix cache holds, told to the router as it changes.

After each loop turn the block manager's changes go out as one numbered `KVEvents` batch; on
registration, and when the router asks (`KVResync`), a snapshot of every cached block follows,
in chunks that fit a frame header.
"""

from __future__ import annotations

from collections.abc import Callable

from baton.scheduler.kv_index import key_of
from baton.server.wire import messages as m

SNAPSHOT_CHUNK = 50_000  # keys per message: ~450 KB of msgpack, under the 1 MiB header cap


class KVEventPublisher:
    def __init__(self, block_manager, send: Callable[[object], None], worker_id: str) -> None:
        self._bm = block_manager
        self._send = send
        self._worker_id = worker_id
        self._seq = 0

    def _batch(self, reset: bool, stored: list[int], removed: list[int]) -> None:
        self._send(
            m.KVEvents(
                worker_id=self._worker_id,
                seq=self._seq,
                reset=reset,
                stored=stored,
                removed=removed,
            )
        )
        self._seq += 1

    def publish(self) -> None:
        """The changes since the last batch, if any."""
        stored, removed = self._bm.take_events()
        if stored or removed:
            self._batch(False, [key_of(h) for h in stored], [key_of(h) for h in removed])

    def snapshot(self) -> None:
        """Every cached block, the first chunk resetting the router's view."""
        self._bm.take_events()  # the snapshot covers them
        keys = [key_of(h) for h in self._bm.cached_hashes()]
        for start in range(0, max(1, len(keys)), SNAPSHOT_CHUNK):
            self._batch(start == 0, keys[start : start + SNAPSHOT_CHUNK], [])
