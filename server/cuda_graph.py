"""CUDA graphs of the decode step, one per batch-size bucket.

At small batch a decode step is mostly kernel launches; a graph replay issues them all at once.
A step whose sequences all decode, and fit the largest bucket, is padded up to its bucket and
replayed; anything else (a prefill in the batch, a larger batch) runs eagerly.
"""

from __future__ import annotations

import logging

import torch

from baton.server.attention.base import AttentionBackend, AttentionMetadata, ForwardContext

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 256


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Buckets 1, 2, 4, 8, then every 16 up to the first one that holds `max_num_seqs` (at most
    MAX_CAPTURE_SIZE), as vLLM does: padding wastes at most 15 rows of a large batch."""
    limit = min(max(1, max_num_seqs), MAX_CAPTURE_SIZE)
    sizes = []
    for s in [1, 2, 4, 8, *range(16, MAX_CAPTURE_SIZE + 1, 16)]:
        sizes.append(s)
        if s >= limit:
            break
    return sizes


def bucket_for(n: int, sizes: list[int]) -> int | None:
    """The smallest bucket that holds `n` sequences, or None when none does."""
    return next((s for s in sizes if s >= n), None)


class DecodeGraphs:
    """Static input buffers shared by every bucket, and one captured graph per bucket."""

    def __init__(
        self,
        model: torch.nn.Module,
        backend: AttentionBackend,
        kv_cache: torch.Tensor,
        block_size: int,
        max_model_len: int,
        sizes: list[int],
        fused_ops: bool,
    ) -> None:
        self.model, self.backend, self.kv_cache = model, backend, kv_cache
        self.block_size, self.max_model_len = block_size, max_model_len
        self.sizes, self.fused_ops = sizes, fused_ops
        device, n = kv_cache.device, sizes[-1]
        width = -(-max_model_len // block_size)
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        # NOTE: padded rows write their K/V nowhere (slot -1) and read one token of block 0.
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        """Metadata over the static buffers. Host lengths are the longest allowed, so the
        backend fixes its launch shapes (split counts) for any context a replay may bring."""
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.tables[:bs],
            slot_mapping=self.slots[:bs],
            query_lens_cpu=[1] * bs,
            seq_lens_cpu=[self.max_model_len] * bs,
            num_decodes=bs,
            max_seq_len=self.max_model_len,
            block_size=self.block_size,
            extras={},
        )
        self.backend.prepare(meta)
        return meta

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first: the smaller ones reuse its memory
            ctx = ForwardContext(self.backend, self._meta(bs), self.kv_cache, self.fused_ops)
            ids, pos = self.ids[:bs], self.positions[:bs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the kernels outside the capture
                for _ in range(2):
                    self.model(ids, pos, ctx)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(ids, pos, ctx)
            pool = graph.pool()
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (
            meta.num_decodes == meta.num_seqs
            and bucket_for(meta.num_seqs, self.sizes) is not None
            and meta.block_tables.shape[1] <= self.tables.shape[1]
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # input_ids, positions: [n] -> hidden [n, hidden_size]
        n = meta.num_seqs
        bs = bucket_for(n, self.sizes)
        self.ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.slots[:n].copy_(meta.slot_mapping)
        if bs > n:
            self.seq_lens[n:bs].fill_(1)
            self.slots[n:bs].fill_(-1)
        graph, out = self.graphs[bs]
        graph.replay()
        return out[:n]
