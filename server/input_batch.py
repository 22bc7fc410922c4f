"""Turns a scheduled batch into the model's input tensors with O(batch + new tokens) host work."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.scheduler.batch import ScheduledBatch
from baton.scheduler.sequence import Sequence
from baton.server.attention.base import AttentionMetadata
from baton.server.attention.block_table import BlockTables
from baton.server.attention.metadata import slot_mapping, token_positions
from baton.server.staging import Staging


@dataclass
class StepInputs:
    """One step's model inputs, on the device."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] int64: the row of each sampling sequence's last new token
    sample_seqs: list[Sequence]


def _new_tokens(seq: Sequence, start: int, n: int) -> list[int]:
    """Tokens `start:start + n` of `seq`, without building its whole token list."""
    prompt, output = seq.prompt_token_ids, seq.output_token_ids
    p = len(prompt)
    if start + n <= p:
        return prompt[start : start + n]
    if start >= p:
        return output[start - p : start - p + n]
    return prompt[start:] + output[: start + n - p]


def _pack(segments: list[list[int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """All segments in one list, and each one's (offset, length). NOTE: every segment starts at
    a multiple of 4 values (16 bytes), so a kernel handed a view of one gets an aligned pointer,
    the case Triton specializes for."""
    flat = segments[0]  # reused: the caller's list of input ids
    spans = [(0, len(flat))]
    for seg in segments[1:]:
        flat += [0] * (-len(flat) % 4)
        spans.append((len(flat), len(seg)))
        flat += seg
    return flat, spans


class InputBatch:
    """Per step, the host sends only token ids, lengths, rows and the block-table entries that
    changed, in one upload; positions, slot mapping and padded block tables are built on the
    device from the persistent `BlockTables`."""

    def __init__(
        self, max_num_seqs: int, max_model_len: int, block_size: int, device: torch.device
    ) -> None:
        self.block_size = block_size
        self.tables = BlockTables(max_num_seqs, -(-max_model_len // block_size), device)
        self.staging = Staging(device)

    def release(self, seq_id: str) -> None:
        self.tables.release(seq_id)

    def prepare(self, batch: ScheduledBatch) -> StepInputs | None:
        """None for an empty batch. Decodes must come first, as the batcher orders them."""
        if not batch.seqs:
            return None
        bs = self.block_size
        ids: list[int] = []
        starts = [0]
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        num_decodes = max_blocks = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            end = start + n
            blocks = len(seq.block_table)
            if n <= 0 or blocks * bs < end:
                raise ValueError(
                    f"bad sequence {seq.seq_id}: {n} new tokens at {start}, {blocks} blocks"
                )
            ids += _new_tokens(seq, start, n)
            if n == 1 and num_decodes == len(query_lens):
                num_decodes += 1
            query_lens.append(n)
            seq_lens.append(end)
            starts.append(starts[-1] + n)
            max_blocks = max(max_blocks, blocks)
            if end == seq.num_tokens:
                sample_rows.append(starts[-1] - 1)
                sample_seqs.append(seq)
        rows, index, values = self.tables.stage(batch.seqs)
        t, b = len(ids), len(rows)
        flat, spans = _pack([ids, starts, seq_lens, rows, sample_rows, index, values])
        dev = self.staging.upload(flat)
        ids_t, qsl_t, lens_t, rows_t, sample_t, index_t, values_t = (
            dev[o : o + n] for o, n in spans
        )
        self.tables.apply(index_t, values_t)
        block_tables = self.tables.gather(rows_t, max_blocks)
        seq_idx, positions = token_positions(qsl_t, lens_t, t, num_decodes == b)
        meta = AttentionMetadata(
            query_start_loc=qsl_t,
            seq_lens=lens_t,
            block_tables=block_tables,
            slot_mapping=slot_mapping(block_tables, seq_idx, positions, bs),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            num_decodes=num_decodes,
            max_seq_len=max(seq_lens),
            block_size=bs,
            extras={},
        )
        return StepInputs(ids_t.long(), positions, meta, sample_t.long(), sample_seqs)
