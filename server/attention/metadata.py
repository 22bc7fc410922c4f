"""Build the per-step AttentionMetadata from plain lists (done once per step, on the host)."""

from __future__ import annotations

import torch

from baton.server.attention.base import AttentionMetadata


def build_attention_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str,
) -> AttentionMetadata:
    """Sequences must be ordered decodes (query_len == 1) first; `seq_lens` count the new tokens."""
    if not (len(query_lens) == len(seq_lens) == len(block_tables)):
        raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    slots: list[int] = []
    starts = [0]
    for q, s, table in zip(query_lens, seq_lens, block_tables, strict=True):
        if not 0 < q <= s or len(table) * block_size < s:
            raise ValueError(f"bad sequence: query_len={q} seq_len={s} blocks={len(table)}")
        for pos in range(s - q, s):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + q)
    max_blocks = max((len(t) for t in block_tables), default=0)
    padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(
            len(block_tables), max_blocks
        ),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
        num_decodes=num_decodes,
        max_seq_len=max(seq_lens, default=0),
        block_size=block_size,
        extras={},
    )
