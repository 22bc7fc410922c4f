"""Turns a scheduled batch into tensors, runs the model, and samples the next tokens."""

from __future__ import annotations

import logging

import torch

from baton.scheduler.batch import ScheduledBatch
from baton.server.attention import ForwardContext, get_attention_backend
from baton.server.attention.metadata import build_attention_metadata
from baton.server.kv_cache import allocate_kv_cache
from baton.server.sampler import Sampler, SampleResult

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, the KV cache tensor, the attention backend and the sampler of one worker."""

    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        attention_backend: str | None,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.backend = get_attention_backend(attention_backend, device.type)
        self.kv_cache = allocate_kv_cache(
            num_blocks, num_layers, block_size, num_kv_heads, head_dim, dtype, device
        )
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> dict[str, SampleResult]:
        """Run one step; returns a sample for every sequence that reached its last known token."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens, seq_lens, tables = [], [], []
        sample_rows: list[int] = []
        sample_seqs = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            tokens = seq.token_ids
            input_ids.extend(tokens[start : start + n])
            positions.extend(range(start, start + n))
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(seq.block_table)
            if start + n == seq.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_seqs.append(seq)
        if not input_ids:
            return {}
        meta = build_attention_metadata(query_lens, seq_lens, tables, self.block_size, self.device)
        self.backend.prepare(meta)
        ctx = ForwardContext(backend=self.backend, meta=meta, kv_cache=self.kv_cache)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, ctx)
        if not sample_seqs:
            return {}
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        results = self.sampler(logits, sample_seqs)
        return {s.seq_id: r for s, r in zip(sample_seqs, results, strict=True)}

    def release(self, seq_id: str) -> None:
        self.sampler.release(seq_id)
