"""Turns a scheduled batch into tensors, runs the model, and samples the next tokens."""

from __future__ import annotations

import logging

import torch

from baton.scheduler.batch import ScheduledBatch
from baton.server.attention import ForwardContext, get_attention_backend
from baton.server.cuda_graph import DecodeGraphs, capture_sizes
from baton.server.host_memory import resident_bytes
from baton.server.input_batch import InputBatch
from baton.server.kv_cache import allocate_kv_cache
from baton.server.models.cpu_linear import is_cpu_float32
from baton.server.models.cpu_linear_plan import resolve_plan
from baton.server.sampler import Sampler, SampleResult
from baton.server.warmup import compile_kernels

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
        max_model_len: int = 0,
        max_num_seqs: int = 1,
        max_num_batched_tokens: int = 0,
        cuda_graphs: bool = False,
        cpu_linear: str = "auto",
    ) -> None:
        self.model = model
        self.device = device
        self.cpu_linear = ""  # the plan float32 CPU linears run (see cpu_linear_plan)
        if is_cpu_float32(model.lm_head.weight):
            plan, source = resolve_plan(cpu_linear, model.cpu_linear_units())
            model.use_cpu_linear_plan(plan.ranges, keeps_dense="dense" in plan.forms)
            self.cpu_linear = str(plan)
            logger.info(
                "float32 CPU linears: %s (%s, %d threads)", plan, source, torch.get_num_threads()
            )
        self.block_size = block_size
        self.backend = get_attention_backend(attention_backend, device.type)
        # The Triton backend brings the fused norm, rotary and SiLU kernels with it.
        self.fused_ops = self.backend.name == "triton"
        self.kv_cache = allocate_kv_cache(
            num_blocks, num_layers, block_size, num_kv_heads, head_dim, dtype, device
        )
        self.sampler = Sampler()
        self.inputs = InputBatch(max_num_seqs, max_model_len, block_size, device)
        if device.type == "cuda" and self.fused_ops:  # so no serving step compiles a kernel
            compile_kernels(
                model,
                self.backend,
                self.kv_cache,
                block_size,
                max_num_batched_tokens or max_model_len,
                max_model_len,
                self.fused_ops,
            )
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and device.type == "cuda" and self.fused_ops:
            self.graphs = DecodeGraphs(
                model,
                self.backend,
                self.kv_cache,
                block_size,
                max_model_len,
                capture_sizes(max_num_seqs),
                self.fused_ops,
            )
            self.graphs.capture()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, guided=None) -> dict[str, SampleResult]:
        """Run one step; returns a sample for every sequence that reached its last known token.
        `guided` (a GuidedDecoding) masks the tokens of constrained sequences."""
        inputs = self.inputs.prepare(batch)
        if inputs is None:
            return {}
        meta = inputs.meta
        self.backend.prepare(meta)
        ctx = ForwardContext(self.backend, meta, self.kv_cache, fused_ops=self.fused_ops)
        if self.graphs is not None and self.graphs.can_run(meta):
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, meta)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, ctx)
        if not inputs.sample_seqs:
            return {}
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        allowed = guided.bitmask([s.seq_id for s in inputs.sample_seqs]) if guided else None
        results = self.sampler(logits, inputs.sample_seqs, allowed)
        return {s.seq_id: r for s, r in zip(inputs.sample_seqs, results, strict=True)}

    def release(self, seq_id: str) -> None:
        """Forget a sequence that ended (finished, aborted or handed off)."""
        self.sampler.release(seq_id)
        self.inputs.release(seq_id)

    def kv_resident_bytes(self) -> int:
        """How much of the KV cache is in memory: on the host, its resident pages (all of them
        once `allocate_kv_cache` wrote it, unless swapped out); on a GPU, all of it."""
        c = self.kv_cache
        if c.device.type != "cpu":
            return c.nbytes
        return resident_bytes(c.data_ptr(), c.nbytes)
