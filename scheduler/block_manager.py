"""Paged KV block allocator with automatic prefix caching (pure Python)."""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC

from baton.scheduler.sequence import Sequence


def hash_block(parent: bytes | None, token_ids: SequenceABC[int]) -> bytes:
    """Chain hash of one full block: stable across processes and runs (unlike `hash()`)."""
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def salt_root(salt: str) -> bytes | None:
    """Where a tenant's chain of block hashes starts (None: the shared, unsalted chain)."""
    return (
        hashlib.blake2b(b"cache_salt:" + salt.encode(), digest_size=16).digest() if salt else None
    )


def compute_block_hashes(
    token_ids: SequenceABC[int], block_size: int, salt: str = ""
) -> list[bytes]:
    """The chain hash of each full block of `token_ids`, in order (a trailing partial block has
    none). Equal lists mean equal prefixes; `check_invariants` checks each table against them."""
    hashes: list[bytes] = []
    parent = salt_root(salt)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


class BlockManager:
    """Hands out KV blocks to sequences and shares full blocks whose contents were seen before.

    NOTE: invariants (see `check_invariants`): a block's ref count is the number of live block
    tables holding it; exactly the ref-0 blocks sit in the free queue, least recently freed first;
    a free block keeps its hash, and stays findable, until it is handed out again; only full,
    hashed blocks are ever shared (ref > 1).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.num_hashed: dict[str, int] = {}  # seq_id -> leading blocks of its table hashed
        self.prefix_queries = 0
        self.prefix_hits = 0
        # KV events: whether each hash changed since `take_events` ends findable (True) or not
        # (False); a router keeps an index of what each worker holds from them.
        self._changes: dict[bytes, bool] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> int:
        """Attach the longest cached run of full blocks that starts `seq`; returns its tokens."""
        if seq.block_table:
            return 0
        hits: list[int] = []
        if self.enable_prefix_caching:
            bs = self.block_size
            tokens = seq.token_ids
            parent = salt_root(seq.params.cache_salt)
            # NOTE: at least one token must be left to compute, so the step that follows samples.
            for i in range((seq.num_tokens - 1) // bs):
                parent = hash_block(parent, tokens[i * bs : (i + 1) * bs])
                block = self.hash_to_block.get(parent)
                if block is None:
                    break
                hits.append(block)
            for block in hits:
                self._take(block)
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += len(hits) * bs
        if hits:
            self.num_hashed[seq.seq_id] = len(hits)
        seq.block_table = hits
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        return seq.num_computed_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow `seq.block_table` to hold `num_new_tokens` more tokens; all or nothing."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        needed -= len(seq.block_table)
        if needed > len(self.free_queue):
            return False
        for _ in range(needed):
            block, _ = self.free_queue.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hash and register the blocks that the last step filled with computed tokens."""
        if not self.enable_prefix_caching:
            return
        done = self.num_hashed.get(seq.seq_id, 0)
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full <= done:
            return
        bs = self.block_size
        tokens = seq.token_ids
        if done:
            parent = self.block_hashes[seq.block_table[done - 1]]
        else:
            parent = salt_root(seq.params.cache_salt)
        for i in range(done, full):
            block = seq.block_table[i]
            parent = hash_block(parent, tokens[i * bs : (i + 1) * bs])
            self.block_hashes[block] = parent
            # NOTE: a block with the same contents may already be registered; keep that entry and
            # let this one stay private to `seq`.
            if self.hash_to_block.setdefault(parent, block) == block:
                self._changes[parent] = True
        self.num_hashed[seq.seq_id] = full

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; its tail blocks become the first to be evicted."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
        seq.block_table = []
        self.num_hashed.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget the contents of every free block (blocks in use keep theirs)."""
        for block in self.free_queue:
            self._evict(block)

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _evict(self, block: int) -> None:
        h = self.block_hashes[block]
        if h is not None:
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
                self._changes[h] = False
            self.block_hashes[block] = None

    def take_events(self) -> tuple[list[bytes], list[bytes]]:
        """(stored, removed): the hashes that became findable and those that stopped being, net
        of everything since the last call (disjoint lists)."""
        changes, self._changes = self._changes, {}
        return [h for h, v in changes.items() if v], [h for h, v in changes.items() if not v]

    def cached_hashes(self) -> list[bytes]:
        """Every findable block hash (a snapshot for the router's index)."""
        return list(self.hash_to_block)

    def check_invariants(self, live_seqs: Iterable[Sequence]) -> None:
        """Raise AssertionError if the allocator's state is inconsistent with `live_seqs`."""
        bs = self.block_size
        holders: Counter[int] = Counter()
        for seq in live_seqs:
            table = seq.block_table
            holders.update(table)
            assert seq.num_computed_tokens <= len(table) * bs, (
                f"{seq.seq_id}: {seq.num_computed_tokens} computed tokens in {len(table)} blocks"
            )
            hashed = self.num_hashed.get(seq.seq_id, 0)
            assert hashed <= len(table) and hashed * bs <= seq.num_computed_tokens, (
                f"{seq.seq_id}: {hashed} hashed blocks, {seq.num_computed_tokens} computed tokens"
            )
            if self.enable_prefix_caching and hashed:
                salt = seq.params.cache_salt
                expected = compute_block_hashes(seq.token_ids[: hashed * bs], bs, salt)
                actual = [self.block_hashes[b] for b in table[:hashed]]
                assert actual == expected, f"{seq.seq_id}: block hashes do not match its tokens"
            for i, block in enumerate(table):
                if self.ref_counts[block] > 1:
                    assert i < hashed and self.block_hashes[block] is not None, (
                        f"block {block} is shared (ref {self.ref_counts[block]}) but not full "
                        f"and hashed in {seq.seq_id}"
                    )
        num_used = 0
        for block in range(self.num_blocks):
            ref = self.ref_counts[block]
            assert ref == holders[block], (
                f"block {block}: ref count {ref}, held by {holders[block]} live block tables"
            )
            assert (ref == 0) == (block in self.free_queue), (
                f"block {block}: ref count {ref} but in free queue: {block in self.free_queue}"
            )
            num_used += ref > 0
        assert len(holders) == num_used, "a live block table holds an unknown block id"
        assert self.num_free_blocks + num_used == self.num_blocks, "free + used != num_blocks"
        for h, block in self.hash_to_block.items():
            assert self.block_hashes[block] == h, f"hash map points to block {block} (stale hash)"
