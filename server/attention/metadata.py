"""Per-step AttentionMetadata: built from plain lists on the host (tests, reference), and the
positions and slot mapping that the model runner computes with device ops instead."""

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


def token_positions(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, all_decodes: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-side: the sequence and the position of each new token, both [T] int64.

    Sequence `i`'s new tokens are the last `query_lens[i]` of its `seq_lens[i]`, so token `t`
    sits at `seq_lens[i] - query_start_loc[i + 1] + t`.
    """
    # query_start_loc: [B + 1] int32; seq_lens: [B] int32
    n = seq_lens.shape[0]
    lens = seq_lens.long()
    if all_decodes:  # one token per sequence: skip the repeat
        return torch.arange(n, device=lens.device), lens - 1
    qsl = query_start_loc.long()
    seq_idx = torch.repeat_interleave(
        torch.arange(n, device=lens.device), qsl[1:] - qsl[:-1], output_size=num_tokens
    )
    positions = torch.arange(num_tokens, device=lens.device) + (lens - qsl[1:])[seq_idx]
    return seq_idx, positions


def slot_mapping(
    block_tables: torch.Tensor, seq_idx: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Device-side: the cache slot of each new token, [T] int64."""
    # block_tables: [B, max_blocks] int32; seq_idx, positions: [T] int64
    blocks = block_tables[seq_idx, positions // block_size].long()
    return blocks * block_size + positions % block_size
