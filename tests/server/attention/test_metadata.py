"""Positions and slot mapping computed with device ops against the per-token Python loop."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.server.attention.metadata import build_attention_metadata, slot_mapping, token_positions

SEQS = st.lists(st.tuples(st.integers(1, 40), st.integers(0, 60)), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(seqs=SEQS, block_size=st.sampled_from([1, 4, 16]), seed=st.integers(0, 1_000))
def test_slot_mapping_matches_python(seqs, block_size, seed):
    rng = random.Random(seed)
    # (query_len, cached prefix) per sequence, decodes first as the batcher orders them.
    seqs = sorted(seqs, key=lambda s: s[0] != 1)
    query_lens = [q for q, _ in seqs]
    seq_lens = [q + c for q, c in seqs]
    free = list(range(12 * 100))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-s // block_size))] for s in seq_lens]
    meta = build_attention_metadata(query_lens, seq_lens, tables, block_size, "cpu")
    t = sum(query_lens)
    all_decodes = meta.num_decodes == len(seqs)
    seq_idx, positions = token_positions(meta.query_start_loc, meta.seq_lens, t, all_decodes)
    expected_pos = [p for q, s in zip(query_lens, seq_lens, strict=True) for p in range(s - q, s)]
    assert positions.tolist() == expected_pos
    assert seq_idx.tolist() == [i for i, q in enumerate(query_lens) for _ in range(q)]
    slots = slot_mapping(meta.block_tables, seq_idx, positions, block_size)
    assert slots.dtype == torch.int64
    assert torch.equal(slots, meta.slot_mapping)
    if all_decodes:  # the general path agrees with the decode shortcut
        _, general = token_positions(meta.query_start_loc, meta.seq_lens, t, False)
        assert torch.equal(general, positions)
