"""A step's input tensors, built incrementally on the device, against the from-scratch lists."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.scheduler.batch import ScheduledBatch
from baton.scheduler.sampling_params import SamplingParams
from baton.scheduler.sequence import Sequence
from baton.server.attention.metadata import build_attention_metadata
from baton.server.input_batch import InputBatch

CPU = torch.device("cpu")
BS = 4


def check_step(ib: InputBatch, batch: ScheduledBatch) -> None:
    got = ib.prepare(batch)
    ids, positions, query_lens, seq_lens, tables, rows = [], [], [], [], [], []
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        start = seq.num_computed_tokens
        ids += seq.token_ids[start : start + n]
        positions += range(start, start + n)
        query_lens.append(n)
        seq_lens.append(start + n)
        tables.append(seq.block_table)
        if start + n == seq.num_tokens:
            rows.append(len(ids) - 1)
    ref = build_attention_metadata(query_lens, seq_lens, tables, ib.block_size, CPU)
    assert got.input_ids.dtype == got.positions.dtype == torch.int64
    assert got.input_ids.tolist() == ids
    assert got.positions.tolist() == positions
    assert got.sample_rows.tolist() == rows
    assert [s.seq_id for s in got.sample_seqs] == [
        s.seq_id for s, r in zip(batch.seqs, batch.samples, strict=True) if r
    ]
    meta = got.meta
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
        a, b = getattr(meta, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for name in ("query_lens_cpu", "seq_lens_cpu", "num_decodes", "max_seq_len", "block_size"):
        assert getattr(meta, name) == getattr(ref, name), name


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 12))
def test_steps_match_the_lists(seed, steps):
    """Decodes, prefill chunks that straddle prompt and output (a recompute), finishes,
    preemptions; one input batch across all the steps."""
    rng = random.Random(seed)
    ib = InputBatch(max_num_seqs=3, max_model_len=32, block_size=BS, device=CPU)
    next_block = 0
    seqs: list[Sequence] = []
    for step in range(steps):
        if not seqs or rng.random() < 0.3:
            prompt = [rng.randrange(3, 100) for _ in range(rng.randint(1, 20))]
            out = [rng.randrange(3, 100) for _ in range(rng.randint(0, 10))]
            seqs.append(Sequence(f"s{step}", prompt, SamplingParams(), output_token_ids=out))
        if len(seqs) > 1 and rng.random() < 0.2:
            ib.release(seqs.pop(rng.randrange(len(seqs))).seq_id)
        plan = []
        for seq in seqs:
            if rng.random() < 0.15:  # preempted: computed nothing, gets a new table
                seq.block_table, seq.num_computed_tokens = [], 0
            left = seq.num_tokens - seq.num_computed_tokens
            if left == 0:  # everything computed: a token was sampled
                seq.output_token_ids.append(rng.randrange(3, 100))
                left = 1
            n = rng.randint(1, left)
            need = -(-(seq.num_computed_tokens + n) // BS) - len(seq.block_table)
            seq.block_table.extend(range(next_block, next_block + need))
            next_block += need
            plan.append((n != 1, seq, n))
        plan.sort(key=lambda p: p[0])  # decodes first
        batch = ScheduledBatch(
            seqs=[s for _, s, _ in plan],
            num_new_tokens=[n for _, _, n in plan],
            num_decodes=sum(not p for p, _, _ in plan),
        )
        check_step(ib, batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n


def test_decode_step_uploads_o_of_batch(monkeypatch):
    """64 sequences at ~300 tokens: after the first step, a decode step uploads one id, three
    lengths and a row per sequence, and two values per new block, not its table."""
    rng = random.Random(0)
    ib = InputBatch(max_num_seqs=64, max_model_len=512, block_size=16, device=CPU)
    seqs = []
    for i in range(64):
        seq = Sequence(f"s{i}", [rng.randrange(3, 100) for _ in range(300 + i)], SamplingParams())
        seq.block_table = list(range(i * 32, i * 32 + -(-(300 + i) // 16)))
        seq.num_computed_tokens = seq.num_tokens - 1
        seqs.append(seq)
    sizes = []
    upload = ib.staging.upload
    monkeypatch.setattr(ib.staging, "upload", lambda v: sizes.append(len(v)) or upload(v))
    for step in range(20):
        new_blocks = 0
        for i, seq in enumerate(seqs):
            if seq.num_tokens > 16 * len(seq.block_table):
                seq.block_table.append(i * 32 + len(seq.block_table))
                new_blocks += 1
        before = ib.tables.num_uploaded
        batch = ScheduledBatch(seqs=seqs, num_new_tokens=[1] * 64, num_decodes=64)
        check_step(ib, batch)
        if step:
            assert ib.tables.num_uploaded - before == new_blocks
            # Seven segments, each padded to a multiple of 4 values.
            assert 64 * 5 + 1 + 2 * new_blocks <= sizes[-1] <= 64 * 5 + 1 + 2 * new_blocks + 18
        for seq in seqs:
            seq.num_computed_tokens += 1
            seq.output_token_ids.append(rng.randrange(3, 100))
