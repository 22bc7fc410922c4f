"""Which prefix blocks each worker holds, from the KV events workers send (pure Python).

A block is named by its chain hash (`block_manager.hash_block`), carried as a 63-bit integer
(`key_of`). Each worker's events come numbered; a batch out of order, or a worker holding more
blocks than it has, means the router's view is wrong: the worker's entries are dropped and the
caller asks it for a snapshot (a batch with `reset`). Memory is bounded by the workers' blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from baton.scheduler.block_manager import compute_block_hashes

KEY_MASK = (1 << 63) - 1


def key_of(block_hash: bytes) -> int:
    return int.from_bytes(block_hash[:8], "little") & KEY_MASK


def prompt_keys(token_ids: Sequence[int], block_size: int, salt: str = "") -> list[int]:
    """The keys of a prompt's full blocks, in order (what a worker's cache would hold)."""
    return [key_of(h) for h in compute_block_hashes(token_ids, block_size, salt)]


class KVIndex:
    def __init__(self) -> None:
        self._blocks: dict[str, set[int]] = {}  # worker -> keys it holds
        self._capacity: dict[str, int] = {}
        self._next_seq: dict[str, int] = {}  # the batch number expected next; absent: unsynced

    def add_worker(self, worker_id: str, capacity: int) -> None:
        """A worker joined (or came back): nothing is known of it until its snapshot."""
        self._blocks[worker_id] = set()
        self._capacity[worker_id] = capacity
        self._next_seq.pop(worker_id, None)

    def drop(self, worker_id: str) -> None:
        """The worker died, drained or left: it holds nothing the router may count on."""
        self._blocks.pop(worker_id, None)
        self._capacity.pop(worker_id, None)
        self._next_seq.pop(worker_id, None)

    def apply(
        self, worker_id: str, seq: int, reset: bool, stored: Iterable[int], removed: Iterable[int]
    ) -> bool:
        """One batch of the worker's events. False: the index lost track of this worker (a
        batch missing or out of order, more blocks than it has): its entries are dropped and
        the caller should ask for a snapshot (once: batches until it comes are ignored)."""
        blocks = self._blocks.get(worker_id)
        if blocks is None:
            return True  # not (or no longer) a worker of the pool: ignore
        expected = self._next_seq.get(worker_id)
        if reset:
            blocks.clear()
        elif expected is None:
            return True  # out of sync already: waiting for the snapshot asked for
        elif expected != seq:
            blocks.clear()
            self._next_seq.pop(worker_id, None)
            return False
        blocks.difference_update(removed)
        blocks.update(stored)
        if len(blocks) > self._capacity[worker_id]:
            blocks.clear()
            self._next_seq.pop(worker_id, None)
            return False
        self._next_seq[worker_id] = seq + 1
        return True

    def matched(self, worker_id: str, keys: Sequence[int]) -> int:
        """How many leading blocks of `keys` the worker holds."""
        blocks = self._blocks.get(worker_id)
        if not blocks:
            return 0
        n = 0
        for k in keys:
            if k not in blocks:
                break
            n += 1
        return n

    def size(self, worker_id: str) -> int:
        return len(self._blocks.get(worker_id, ()))
