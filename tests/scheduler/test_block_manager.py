from __future__ import annotations

import pytest

from baton.scheduler.block_manager import BlockManager, compute_block_hashes, hash_block
from baton.scheduler.sampling_params import SamplingParams
from baton.scheduler.sequence import Sequence


def make_seq(seq_id: str, tokens: list[int]) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=list(tokens), params=SamplingParams())


def prefill(bm: BlockManager, seq: Sequence) -> None:
    """Admit `seq` and compute its whole prompt, as one engine step would."""
    bm.match_prefix(seq)
    assert bm.allocate_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_compute_block_hashes_is_a_stable_chain():
    tokens = list(range(10))
    hashes = compute_block_hashes(tokens, 4)
    assert len(hashes) == 2  # the trailing partial block has no hash
    assert all(isinstance(h, bytes) and len(h) == 16 for h in hashes)
    assert hashes[0] == hash_block(None, [0, 1, 2, 3])
    assert hashes[1] == hash_block(hashes[0], [4, 5, 6, 7])
    assert compute_block_hashes(tokens, 4) == hashes
    assert compute_block_hashes([9, 9, 9, 9, 4, 5, 6, 7], 4)[1] != hashes[1]


def test_prefix_hit_shares_full_blocks_and_leaves_one_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    shared = [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # three full blocks
    a = make_seq("a", shared + [20, 21])
    prefill(bm, a)
    bm.check_invariants([a])

    b = make_seq("b", shared + [30])
    assert bm.match_prefix(b) == 12
    assert b.block_table == a.block_table[:3]
    assert b.num_computed_tokens == b.num_cached_tokens == 12
    assert bm.allocate_slots(b, b.num_uncomputed_tokens)
    assert len(b.block_table) == 4 and b.block_table[3] not in a.block_table
    bm.check_invariants([a, b])
    assert (bm.prefix_queries, bm.prefix_hits) == (14 + 13, 12)

    # Same 12 tokens exactly: the cap keeps the last block to compute.
    c = make_seq("c", shared)
    assert bm.match_prefix(c) == 8
    assert c.block_table == a.block_table[:2]
    assert c.num_uncomputed_tokens == 4
    bm.check_invariants([a, b, c])

    for s in (a, b, c):
        bm.free(s)
    bm.check_invariants([])
    assert bm.num_free_blocks == 16


def test_free_blocks_stay_cached_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])
    prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.usage == 0.0
    b = make_seq("b", [1, 2, 3, 4, 9])
    assert bm.match_prefix(b) == 4
    bm.free(b)
    # Taking all four blocks evicts every hash; nothing is found afterwards.
    c = make_seq("c", [8] * 8)
    assert bm.match_prefix(c) == 0
    assert bm.allocate_slots(c, 8)
    assert bm.usage == 1.0
    bm.free(c)
    assert bm.match_prefix(make_seq("d", [1, 2, 3, 4, 9])) == 0
    assert not bm.hash_to_block


def test_lru_eviction_order_takes_least_recently_freed_and_tails_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])  # 3 blocks, 2 full
    b = make_seq("b", [6, 7, 8, 9, 10])
    prefill(bm, a)
    prefill(bm, b)
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4, 5]
    bm.free(b)
    bm.free(a)
    # b was freed first, tail first: queue is 5, 4, 3, 2, 1, 0.
    assert list(bm.free_queue) == [5, 4, 3, 2, 1, 0]
    c = make_seq("c", [0, 0, 0])
    assert bm.match_prefix(c) == 0
    assert bm.allocate_slots(c, 3)
    assert c.block_table == [5, 4]
    # b's first block (3) is still cached; its second (4) was evicted.
    d = make_seq("d", [6, 7, 8, 9, 10])
    assert bm.match_prefix(d) == 2 and d.block_table == [3]
    e = make_seq("e", [1, 2, 3, 4, 5])
    assert bm.match_prefix(e) == 4 and e.block_table == [0, 1]
    bm.check_invariants([c, d, e])


def test_hash_chain_does_not_match_same_block_after_other_prefix():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])
    prefill(bm, a)
    b = make_seq("b", [9, 9, 3, 4, 5])  # second block equal, first differs
    assert bm.match_prefix(b) == 0
    assert b.block_table == []
    bm.check_invariants([a, b])


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq("a", list(range(9)))
    assert bm.allocate_slots(a, 9)
    assert len(a.block_table) == 3
    b = make_seq("b", list(range(8)))
    assert not bm.allocate_slots(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert bm.allocate_slots(b, 4)
    assert bm.num_free_blocks == 0
    # Growing within the last block needs nothing new.
    a.num_computed_tokens = 9
    assert bm.allocate_slots(a, 3)
    assert not bm.allocate_slots(a, 4)
    assert len(a.block_table) == 3
    bm.check_invariants([a, b])


def test_cache_full_blocks_is_incremental_over_decodes():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq("a", [1, 2, 3])
    prefill(bm, a)
    assert bm.num_hashed["a"] == 1
    for tok in (4, 5, 6):  # decode: sample a token, then compute it
        a.output_token_ids.append(tok)
        assert bm.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        bm.cache_full_blocks(a)
        bm.check_invariants([a])
    assert bm.num_hashed["a"] == 3
    assert [bm.block_hashes[x] for x in a.block_table] == compute_block_hashes(
        [1, 2, 3, 4, 5, 6], 2
    )
    # Generated tokens are cached too.
    b = make_seq("b", [1, 2, 3, 4, 5, 6, 7])
    assert bm.match_prefix(b) == 6


def test_duplicate_contents_keep_the_first_registration():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq("a", [1, 2, 3])
    b = make_seq("b", [1, 2, 4])
    # Both admitted before either is computed: no hit for b, so it computes its own copy.
    for s in (a, b):
        bm.match_prefix(s)
        assert bm.allocate_slots(s, 3)
    for s in (a, b):
        s.num_computed_tokens = 3
        bm.cache_full_blocks(s)
    h = compute_block_hashes([1, 2], 2)[0]
    assert bm.hash_to_block[h] == a.block_table[0]
    assert bm.block_hashes[b.block_table[0]] == h
    bm.check_invariants([a, b])
    a_block = a.block_table[0]
    bm.free(a)
    c = make_seq("c", [1, 2, 3])
    assert bm.match_prefix(c) == 2 and c.block_table == [a_block]
    bm.free(c)
    # Evicting a's block drops the map entry but not the hash of b's private copy.
    x = make_seq("x", [0] * 12)
    assert bm.allocate_slots(x, 12)
    assert h not in bm.hash_to_block
    assert bm.block_hashes[b.block_table[0]] == h
    bm.check_invariants([b, x])


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_seq("a", [1, 2, 3, 4, 5])
    prefill(bm, a)
    b = make_seq("b", [1, 2, 3, 4, 5])
    assert bm.match_prefix(b) == 0
    assert not bm.hash_to_block and bm.prefix_queries == 0
    bm.check_invariants([a, b])


def test_reset_prefix_cache_forgets_free_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq("a", [1, 2, 3])
    b = make_seq("b", [5, 6, 7])
    prefill(bm, a)
    prefill(bm, b)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.match_prefix(make_seq("c", [1, 2, 3])) == 0
    d = make_seq("d", [5, 6, 7])
    assert bm.match_prefix(d) == 2
    bm.check_invariants([b, d])


def test_check_invariants_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq("a", [1, 2, 3])
    prefill(bm, a)
    bm.check_invariants([a])
    with pytest.raises(AssertionError):
        bm.check_invariants([])  # a's blocks are referenced by nobody
    b = make_seq("b", [1, 2, 3])
    b.block_table = list(a.block_table)  # sharing a partial block without a reference
    with pytest.raises(AssertionError):
        bm.check_invariants([a, b])
    bm.ref_counts[a.block_table[1]] += 1
    with pytest.raises(AssertionError, match="not full"):
        bm.check_invariants([a, b])


def test_a_cache_salt_keeps_tenants_prefixes_apart():
    bm = BlockManager(num_blocks=16, block_size=4)
    shared = list(range(1, 13))

    def salted(seq_id, salt):
        return Sequence(
            seq_id=seq_id,
            prompt_token_ids=shared + [99],
            params=SamplingParams(cache_salt=salt),
        )

    a = salted("a", "tenant-a")
    prefill(bm, a)
    b = salted("b", "tenant-b")
    assert bm.match_prefix(b) == 0  # another tenant's blocks are not found
    c = salted("c", "tenant-a")
    assert bm.match_prefix(c) == 12  # the same tenant's are
    assert compute_block_hashes(shared, 4, "tenant-a") != compute_block_hashes(shared, 4)
    bm.check_invariants([a, c])
