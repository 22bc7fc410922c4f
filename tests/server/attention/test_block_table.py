"""The persistent block table against tables built from scratch, over random steps."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.scheduler.batcher import Batcher
from baton.scheduler.config import CacheConfig, SchedulerConfig
from baton.scheduler.sampling_params import SamplingParams
from baton.scheduler.sequence import Sequence
from baton.server.attention.block_table import BlockTables

CPU = torch.device("cpu")


def padded(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


def run_step(bt: BlockTables, seqs: list[Sequence]) -> torch.Tensor:
    """One step's host staging, device update and gather, as the input batch does it."""
    rows, index, values = bt.stage(seqs)
    bt.apply(torch.tensor(index, dtype=torch.int32), torch.tensor(values, dtype=torch.int32))
    width = max(len(s.block_table) for s in seqs)
    got = bt.gather(torch.tensor(rows, dtype=torch.int32), width)
    assert got.dtype == torch.int32 and got.is_contiguous()
    return got


def assert_rows_exact(bt: BlockTables, seqs: list[Sequence]) -> None:
    """NOTE: each staged row holds its table padded with 0 over the whole width."""
    rows, index, _ = bt.stage(seqs)
    assert not index  # nothing changed since the last step: nothing to upload
    for seq, r in zip(seqs, rows, strict=True):
        expected = seq.block_table + [0] * (bt.table.shape[1] - len(seq.block_table))
        assert bt.table[r].tolist() == expected


OPS = st.lists(
    st.tuples(
        st.sampled_from(["new", "append", "reset", "finish", "step"]),
        st.integers(0, 1_000),
        st.integers(0, 9),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=OPS)
def test_incremental_table_equals_scratch(ops):
    """Appends, new and finished sequences, rewritten tables (preemption, handoff) and reused
    rows; the table starts too small in both dimensions, so it also grows."""
    bt = BlockTables(max_rows=2, max_blocks=2, device=CPU)
    live: list[Sequence] = []
    appended: dict[str, int] = {}  # blocks appended since the sequence's last step
    rewritten: set[str] = set()  # new or reset since their last step
    next_id = next_block = 0
    for op, a, b in ops:
        if op == "new" or not live:
            seq = Sequence(f"s{next_id}", [1], SamplingParams())
            next_id += 1
            seq.block_table = list(range(next_block, next_block + b + 1))
            next_block += b + 1
            live.append(seq)
            rewritten.add(seq.seq_id)
        elif op == "append":
            seq = live[a % len(live)]
            seq.block_table.extend(range(next_block, next_block + b))
            next_block += b
            appended[seq.seq_id] = appended.get(seq.seq_id, 0) + b
        elif op == "reset":  # as BlockManager.free, then match_prefix and allocate_slots do
            seq = live[a % len(live)]
            seq.block_table = []
            seq.block_table.extend(range(next_block, next_block + b + 1))
            next_block += b + 1
            rewritten.add(seq.seq_id)
        elif op == "finish":
            bt.release(live.pop(a % len(live)).seq_id)
        else:
            rng = random.Random(a)
            batch = [s for s in live if rng.random() < 0.7] or live[:1]
            before = bt.num_uploaded
            got = run_step(bt, batch)
            assert torch.equal(got, padded([s.block_table for s in batch]))
            ids = [s.seq_id for s in batch]
            if not rewritten.intersection(ids):
                assert bt.num_uploaded - before == sum(appended.get(i, 0) for i in ids)
            for i in ids:
                appended.pop(i, None)
                rewritten.discard(i)
            assert_rows_exact(bt, batch)
        assert bt.num_live <= len(live)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(10, 24))
def test_table_follows_the_batcher(seed, num_blocks):
    """Real block-manager mutations: chunked prefills, prefix hits, preemption under a small
    cache, finishes and aborts (released, as the engine does)."""
    rng = random.Random(seed)
    bs = 4
    batcher = Batcher(
        SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=64),
        CacheConfig(num_blocks=num_blocks, block_size=bs),
    )
    bt = BlockTables(max_rows=4, max_blocks=16, device=CPU)
    shared = [rng.randrange(3, 50) for _ in range(8)]
    for i in range(8):
        tail = [rng.randrange(3, 50) for _ in range(rng.randint(1, 12))]
        params = SamplingParams(max_tokens=rng.randint(1, 10), ignore_eos=True)
        batcher.add(Sequence(f"r{i}", (shared if i % 2 else []) + tail, params))
    for _ in range(200):
        if not batcher.has_unfinished:
            break
        batch = batcher.schedule()
        if batch.seqs:
            got = run_step(bt, batch.seqs)
            assert torch.equal(got, padded([s.block_table for s in batch.seqs]))
        sampled = {s.seq_id: rng.randrange(3, 50) for s in batch.seqs}
        for seq in batcher.update(batch, sampled):
            if seq.is_finished:
                bt.release(seq.seq_id)
        if batcher.running and rng.random() < 0.05:
            victim = rng.choice(batcher.running)
            batcher.abort(victim.seq_id)
            bt.release(victim.seq_id)
    if not batcher.has_unfinished:
        assert bt.num_live == 0  # every ended sequence gave its row back


def test_decode_uploads_only_new_blocks():
    bt = BlockTables(max_rows=64, max_blocks=32, device=CPU)
    seqs = []
    for i in range(64):
        seq = Sequence(f"s{i}", [1], SamplingParams())
        seq.block_table = list(range(i * 32, i * 32 + 19))  # ~300 tokens of 16
        seqs.append(seq)
    run_step(bt, seqs)
    assert bt.num_uploaded == 64 * 19
    before = bt.num_uploaded
    run_step(bt, seqs)  # a decode step that filled no block
    assert bt.num_uploaded == before
    seqs[3].block_table.append(3 * 32 + 19)
    seqs[40].block_table.append(40 * 32 + 19)
    got = run_step(bt, seqs)
    assert bt.num_uploaded - before == 2
    assert torch.equal(got, padded([s.block_table for s in seqs]))


def test_released_row_is_reused_clean():
    bt = BlockTables(max_rows=1, max_blocks=8, device=CPU)
    a = Sequence("a", [1], SamplingParams(), block_table=[5, 6, 7, 8])
    run_step(bt, [a])
    bt.release("a")
    b = Sequence("b", [1], SamplingParams(), block_table=[9])
    got = run_step(bt, [b])
    assert got.tolist() == [[9]]
    assert bt.table.tolist() == [[9, 0, 0, 0, 0, 0, 0, 0]]
    assert bt.table.shape[0] == 1  # the freed row was taken, not a new one
