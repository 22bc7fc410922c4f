"""Every live sequence's block table in one persistent device tensor, updated incrementally."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.scheduler.sequence import Sequence


@dataclass(slots=True)
class _Row:
    index: int
    table: list[int]  # the list last uploaded from: held, so identity stays meaningful
    uploaded: int  # leading entries of `table` the device row holds


class BlockTables:
    """A [rows, max_blocks] int32 table with one row per live sequence (kept until `release`).

    NOTE: a row holds its sequence's table padded with 0, exactly. The block manager only ever
    appends to `seq.block_table` or assigns it a new list (free, prefix match), so a table that
    is still the same list object and no shorter than what was uploaded only gained entries at
    its end: each step uploads those. Any other list (preemption, handoff, reuse) is rewritten
    whole, and the columns its previous contents used are zeroed.
    """

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device) -> None:
        self.device = device
        shape = (max(1, max_rows), max(1, max_blocks))
        self.table = torch.zeros(shape, dtype=torch.int32, device=device)
        self._rows: dict[str, _Row] = {}
        self._free = list(range(self.table.shape[0] - 1, -1, -1))  # pop() takes the lowest
        self._stale = [0] * self.table.shape[0]  # per free row: leading columns maybe nonzero
        self.num_uploaded = 0  # entries sent to the device over the table's life

    @property
    def num_live(self) -> int:
        return len(self._rows)

    def release(self, seq_id: str) -> None:
        row = self._rows.pop(seq_id, None)
        if row is not None:
            self._stale[row.index] = row.uploaded
            self._free.append(row.index)

    def stage(self, seqs: list[Sequence]) -> tuple[list[int], list[int], list[int]]:
        """Host side of a step: each sequence's row, and the (flat index, block id) entries of
        the device table that changed since the last step. Grows the table when it must."""
        self._reserve_columns(max((len(s.block_table) for s in seqs), default=0))
        width = self.table.shape[1]
        rows: list[int] = []
        index: list[int] = []
        values: list[int] = []
        for seq in seqs:
            table = seq.block_table
            n = len(table)
            row = self._rows.get(seq.seq_id)
            if row is None:
                row = self._assign(seq.seq_id, table)
            elif row.table is not table or n < row.uploaded:
                row.table, self._stale[row.index] = table, row.uploaded
                row.uploaded = 0
            done = row.uploaded
            base = row.index * width
            rows.append(row.index)
            if done == 0:
                stale = self._stale[row.index]
                if stale > n:
                    index.extend(range(base + n, base + stale))
                    values.extend([0] * (stale - n))
                self._stale[row.index] = 0
            if n > done:
                index.extend(range(base + done, base + n))
                values.extend(table[done:])
                row.uploaded = n
        self.num_uploaded += len(index)
        return rows, index, values

    def apply(self, index: torch.Tensor, values: torch.Tensor) -> None:
        # index, values: [E] int32 device tensors from `stage`
        if index.numel():
            self.table.view(-1).index_copy_(0, index.long(), values)

    def gather(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        # rows: [B] int32 device tensor -> [B, width] int32 block tables, padded with 0
        return self.table[:, :width].index_select(0, rows)

    def _assign(self, seq_id: str, table: list[int]) -> _Row:
        if not self._free:
            self._grow(2 * self.table.shape[0], self.table.shape[1])
        row = _Row(self._free.pop(), table, 0)
        self._rows[seq_id] = row
        return row

    def _reserve_columns(self, n: int) -> None:
        if n > self.table.shape[1]:
            self._grow(self.table.shape[0], max(n, 2 * self.table.shape[1]))

    def _grow(self, num_rows: int, num_cols: int) -> None:
        old = self.table
        r, c = old.shape
        self.table = torch.zeros(num_rows, num_cols, dtype=torch.int32, device=self.device)
        self.table[:r, :c] = old
        self._free[:0] = range(num_rows - 1, r - 1, -1)
        self._stale.extend([0] * (num_rows - r))
