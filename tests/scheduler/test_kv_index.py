"""The router's index of cached blocks follows a worker's block manager through its events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from baton.scheduler.block_manager import BlockManager
from baton.scheduler.kv_index import KVIndex, key_of, prompt_keys
from tests.scheduler.test_block_manager import make_seq, prefill


def keys(hashes) -> list[int]:
    return [key_of(h) for h in hashes]


def truth(bm: BlockManager) -> set[int]:
    return set(keys(bm.hash_to_block))


def test_events_report_what_becomes_findable_and_what_is_evicted():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])
    prefill(bm, a)
    stored, removed = bm.take_events()
    assert keys(stored) == prompt_keys([1, 2, 3, 4], 2) and removed == []
    assert bm.take_events() == ([], [])
    bm.free(a)
    b = make_seq("b", [9, 8, 7, 6, 5, 4, 3])  # needs all 4 blocks: evicts a's two
    prefill(bm, b)
    stored, removed = bm.take_events()
    assert set(keys(removed)) == set(prompt_keys([1, 2, 3, 4], 2))
    assert keys(stored) == prompt_keys([9, 8, 7, 6, 5, 4], 2)


ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "free", "drop_batch"]), st.integers(0, 5), st.integers(1, 14)
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_the_index_never_reports_a_block_the_worker_evicted(ops):
    """Random admissions and frees (which evict under pressure); each batch of events goes to
    the index, some are lost. After every batch the index holds exactly the worker's findable
    blocks, or, having lost track, nothing and a resync is asked for; it never grows past the
    worker's blocks."""
    bm = BlockManager(num_blocks=8, block_size=2)
    index = KVIndex()
    index.add_worker("w", bm.num_blocks)
    seq_no, live = 0, {}

    def snapshot():
        nonlocal seq_no
        bm.take_events()
        assert index.apply("w", seq_no, True, keys(bm.cached_hashes()), [])
        seq_no += 1

    snapshot()
    seen: set[int] = set()
    for i, (op, prefix, length) in enumerate(ops):
        if op == "add":
            s = make_seq(f"s{i}", [prefix] * 2 + list(range(100 + i, 100 + i + length)))
            bm.match_prefix(s)
            if bm.allocate_slots(s, s.num_uncomputed_tokens):
                s.num_computed_tokens = s.num_tokens
                bm.cache_full_blocks(s)
                live[s.seq_id] = s
            else:
                bm.free(s)
        elif op == "free" and live:
            bm.free(live.pop(sorted(live)[prefix % len(live)]))
        stored, removed = bm.take_events()
        seen |= set(keys(stored))
        seq_no += 1
        if op == "drop_batch":  # this batch is lost on the way
            continue
        if not index.apply("w", seq_no - 1, False, keys(stored), keys(removed)):
            assert index.size("w") == 0  # lost track: holds nothing, a snapshot is asked for
            snapshot()
        held = truth(bm)
        assert index.size("w") == len(held) <= bm.num_blocks
        assert all(index.matched("w", [k]) == 1 for k in held)
        assert all(index.matched("w", [k]) == 0 for k in seen - held)  # never an evicted one


def test_matched_counts_the_leading_run_and_drop_forgets():
    index = KVIndex()
    index.add_worker("a", 10)
    assert index.apply("a", 0, True, [1, 2, 3, 5], [])
    assert index.matched("a", [1, 2, 3, 4, 5]) == 3
    assert index.matched("a", [2, 3]) == 2 and index.matched("a", [9]) == 0
    assert not index.apply("a", 5, False, [4], [])  # a batch was lost: out of sync
    assert index.matched("a", [1]) == 0
    assert index.apply("a", 6, False, [1], [])  # ignored until the snapshot
    assert index.matched("a", [1]) == 0
    assert index.apply("a", 7, True, [1, 2], [])
    assert index.matched("a", [1, 2]) == 2
    assert not index.apply("a", 8, False, list(range(100, 120)), [])  # more than it has
    index.drop("a")
    assert index.matched("a", [1]) == 0 and index.apply("a", 9, True, [1], [])  # unknown: ignored
    assert index.size("a") == 0


def test_prompt_keys_follow_the_salt():
    tokens = list(range(64))
    assert prompt_keys(tokens, 16) != prompt_keys(tokens, 16, "t1")
    assert prompt_keys(tokens, 16, "t1") == prompt_keys(tokens, 16, "t1")
    assert prompt_keys(tokens, 16, "t1")[0] != prompt_keys(tokens, 16, "t2")[0]
