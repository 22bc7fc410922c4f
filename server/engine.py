"""The engine: admits requests, runs steps of the batcher and the model, and reports outputs."""

from __future__ import annotations

import logging
import time

import torch

from baton.scheduler.batcher import Batcher
from baton.scheduler.limits import bound_params, check_prior
from baton.scheduler.sampling_params import SamplingParams
from baton.scheduler.sequence import Sequence
from baton.server.config import EngineConfig, resolve_max_model_len, scheduler_configs
from baton.server.device import resolve_device, resolve_dtype
from baton.server.guided.decoding import GuidedDecoding
from baton.server.handoffs import Handoffs
from baton.server.kv_cache import block_bytes, plan_kv_cache
from baton.server.loader import load_model
from baton.server.model_runner import ModelRunner
from baton.server.outputs import CacheStats, CompletionOutput, RequestOutput
from baton.server.request_state import RequestState
from baton.server.wire.kv_blocks import layout_of
from baton.server.wire.messages import KVLayout

logger = logging.getLogger(__name__)


class LLMEngine:
    """A paged-KV engine with continuous batching; one instance per worker."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        loaded = load_model(
            config.model,
            load_format=config.load_format,
            dtype=self.dtype,
            device=self.device,
            seed=config.seed,
            show_progress=config.show_progress,
            tokenizer=config.detokenize,  # a worker behind a router leaves text to the router
        )
        self.model_name = loaded.name
        self.model_dir = loaded.model_dir
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = resolve_max_model_len(config.max_model_len, mc.max_position_embeddings)
        per_block = block_bytes(
            mc.num_hidden_layers, config.block_size, mc.num_key_value_heads, mc.head_dim, self.dtype
        )
        num_blocks = plan_kv_cache(config, mc, self.dtype, self.device, self.max_model_len)
        self.cache_config, self.scheduler_config = scheduler_configs(
            config, self.max_model_len, num_blocks
        )
        budget = self.scheduler_config.max_num_batched_tokens
        self.batcher = Batcher(self.scheduler_config, self.cache_config)
        self.runner = ModelRunner(
            loaded.model,
            num_blocks,
            config.block_size,
            mc.num_hidden_layers,
            mc.num_key_value_heads,
            mc.head_dim,
            self.dtype,
            self.device,
            config.attention_backend,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=budget,
            cuda_graphs=config.cuda_graphs,
            cpu_linear=config.cpu_linear,
        )
        self.eos_token_id = loaded.eos_token_id
        self._requests: dict[str, RequestState] = {}
        self._seq_owner: dict[str, tuple[RequestState, int]] = {}
        self.handoffs = Handoffs(self.batcher, self.cache_config.block_size)
        eos_ids = [self.eos_token_id, *mc.eos_token_ids]
        self.guided = GuidedDecoding(loaded.model_dir, mc.vocab_size, list(dict.fromkeys(eos_ids)))
        self._held: list[Sequence] = []  # constrained sequences whose grammar is compiling
        logger.info(
            "engine ready: %s on %s/%s, %d KV blocks of %d tokens (%.1f MiB), backend %s",
            self.model_name,
            self.device,
            self.dtype,
            num_blocks,
            config.block_size,
            num_blocks * per_block / 2**20,
            self.runner.backend.name,
        )

    # ---- requests -------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "prompt: text prompts need a tokenizer; this model has none "
                    "(pass token ids instead)"
                )
            return list(self.tokenizer.encode(prompt))
        ids = list(prompt)
        vocab = self.model_config.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt: token id {t!r} is not an integer in [0, {vocab})")
        return ids

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        handoff: bool = False,
        prior_output_ids: list[int] | None = None,
    ) -> None:
        """Queue a request. With `handoff`, it stops after its first token and keeps its prompt's
        KV blocks for `handoffs` (the prefill role of a disaggregated server).

        `prior_output_ids` resumes a request another worker was generating: those tokens count as
        already generated (max_tokens, min_tokens, penalties, the seed's draws), their KV is
        recomputed with the prompt's, and only the tokens after them are returned.
        """
        if request_id in self._requests or request_id in self.handoffs:
            raise ValueError(f"request_id: {request_id!r} is already running")
        token_ids = self.tokenize(prompt)
        if not token_ids:
            raise ValueError("prompt: must not be empty")
        if handoff and params.n != 1:
            raise ValueError("n: a handed-off request must have n == 1")
        if params.stop and not self.config.detokenize:
            raise ValueError("stop: stop strings need an engine that detokenizes")
        params = self._bound_params(params, len(token_ids))
        prior = self.tokenize(check_prior(prior_output_ids or [], params, handoff))
        tokenizer = self.tokenizer if self.config.detokenize else None
        req = RequestState.create(
            request_id, prompt, token_ids, params, prior, handoff, self.eos_token_id, tokenizer
        )
        seqs = req.seqs
        if params.guided:
            self.guided.check(params)
        for seq in seqs:  # validated before anything is allocated
            self.batcher.check(seq)
        for seq in seqs:
            if params.guided:
                self.guided.start(seq.seq_id, seq.params, replay=prior)
                if not self.guided.ready(seq.seq_id):
                    self._held.append(seq)
                    continue
            self.batcher.add(seq)
        self._requests[request_id] = req
        for i, seq in enumerate(seqs):
            self._seq_owner[seq.seq_id] = (req, i)
        if handoff:
            self.handoffs.expect(request_id)

    def _bound_params(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        extra_eos = tuple(e for e in self.model_config.eos_token_ids if e != self.eos_token_id)
        return bound_params(params, prompt_len, self.max_model_len, extra_eos)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        h = self.handoffs.pop(request_id)
        if h is not None and request_id not in self._requests:
            self.guided.release(request_id)
            return None  # its blocks (detached or reserved) are freed
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        for seq, out in zip(req.seqs, req.outputs, strict=True):
            self.batcher.abort(seq.seq_id)
            if seq in self._held:
                self._held.remove(seq)
            self._release(seq.seq_id)
            if not out.finished:
                out.finish_reason = "abort"
        return req.snapshot()

    def abort_all(self) -> list[str]:
        """Abort every request, handed-off prompt and reservation; returns their ids."""
        ids = list(dict.fromkeys([*self._requests, *self.handoffs.ids()]))
        for rid in ids:
            self.abort_request(rid)
        return ids

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One model step. Returns an output (with this step's deltas) per request it advanced."""
        now = time.monotonic()
        failed = self._admit_held()
        batch = self.batcher.schedule()
        if not batch.seqs:
            return failed
        samples = self.runner.execute(batch, self.guided)
        advanced = self.batcher.update(batch, {sid: r.token_id for sid, r in samples.items()})
        self._mark_scheduled(batch.seqs, now)
        touched: dict[str, RequestState] = {}
        for out in self._all_outputs():
            out.text_delta, out.token_ids_delta = "", []
        for seq in advanced:
            req, i = self._seq_owner[seq.seq_id]
            if self.guided.accept(seq.seq_id, seq.output_token_ids[-1]) and not seq.is_finished:
                self.batcher.finish(seq.seq_id, "stop")  # the grammar is complete
            stop_hit = req.record(i, seq, samples[seq.seq_id])
            if stop_hit is not None:
                self.batcher.finish(seq.seq_id, "stop", stop_reason=stop_hit)
            if seq.is_finished:
                req.finish(i, seq)
                self._release(seq.seq_id)
            touched[req.request_id] = req
        results = failed
        for req in touched.values():
            if req.handoff and not req.finished:
                self._detach(req)
            results.append(req.snapshot())
            if req.finished or req.handoff:
                del self._requests[req.request_id]
        return results

    def _admit_held(self) -> list[RequestOutput]:
        """Constrained sequences whose grammar is ready join the batch (waiting for one when
        nothing else could run); a grammar that failed aborts its request."""
        ready, failed = self.guided.sort_out(self._held, wait=not self.batcher.has_unfinished)
        for seq in ready:
            self._held.remove(seq)
            self.batcher.add(seq)
        outs = [self.abort_request(self._seq_owner[seq.seq_id][0].request_id) for seq in failed]
        return [o for o in outs if o is not None]

    def _mark_scheduled(self, seqs: list[Sequence], now: float) -> None:
        for seq in seqs:
            owner = self._seq_owner.get(seq.seq_id)
            if owner is not None and owner[0].queue_time is None:
                owner[0].queue_time = max(0.0, now - owner[0].arrival_time)

    def _all_outputs(self):
        for req in self._requests.values():
            yield from req.outputs

    def _release(self, seq_id: str) -> None:
        self.runner.release(seq_id)
        self.guided.release(seq_id)
        self._seq_owner.pop(seq_id, None)

    # ---- what a worker reads ---------------------------------------------------------------

    @property
    def kv_usage(self) -> float:
        return self.batcher.block_manager.usage

    @property
    def kv_cache(self) -> torch.Tensor:
        """The paged KV cache, whose blocks a handoff ships and writes."""
        return self.runner.kv_cache

    @property
    def kv_layout(self) -> KVLayout:
        return layout_of(self.runner.kv_cache)

    @property
    def cpu_linear(self):
        return self.runner.cpu_linear

    @property
    def cache_stats(self) -> CacheStats:
        b, bm = self.batcher, self.batcher.block_manager
        return CacheStats(
            num_running=b.num_running,
            num_waiting=b.num_waiting,
            usage=float(bm.usage),
            num_free_blocks=bm.num_free_blocks,
            prefix_queries=bm.prefix_queries,
            prefix_hits=bm.prefix_hits,
        )

    # ---- disaggregation (the state lives in `handoffs`) ---------------------------------------

    def _detach(self, req: RequestState) -> None:
        out = req.outputs[0]
        self.handoffs.prompt_done(req.seqs[0], out.logprobs[0] if out.logprobs else None)
        self._release(req.seqs[0].seq_id)

    def reserve_prefilled(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        peer: bytes = b"",
    ) -> list[int] | None:
        """Allocate blocks for a prompt whose KV comes from a prefill worker (`peer`). Returns the
        block ids to write, or None when they are not free now; ValueError if it could never fit."""
        if request_id in self._requests or request_id in self.handoffs:
            raise ValueError(f"request_id: {request_id!r} is already running")
        if params.n != 1:
            raise ValueError("n: a handed-off request must have n == 1")
        ids = self.tokenize(list(prompt_token_ids))
        if not ids:
            raise ValueError("prompt: must not be empty")
        params = self._bound_params(params, len(ids))
        if params.guided:
            self.guided.check(params)
        seq = Sequence(request_id, ids, params, eos_token_id=self.eos_token_id)
        blocks = self.handoffs.reserve(seq, peer)
        if blocks is not None and params.guided:  # compiles while the KV arrives
            self.guided.start(request_id, params, replay=[])
        return blocks

    def commit_prefilled(
        self,
        request_id: str,
        first_token: int,
        first_logprobs: tuple | list | None = None,
        num_cached_tokens: int = 0,
    ) -> RequestOutput | None:
        """The reserved prompt's KV is in place: decode from its first token on. Returns an
        output only if the first token already ends the request. `num_cached_tokens`: what the
        prefill worker found cached (what the request reports; blocks this worker held and
        shared are a saving of the handoff, not of the prefill)."""
        seq = self.handoffs.commit(request_id, first_token)
        seq.num_cached_tokens = num_cached_tokens
        if seq.params.guided and not seq.is_finished:
            ending = self.guided.first_token(request_id, first_token)
            if ending is not None:  # the grammar failed ("abort") or is complete ("stop")
                self.batcher.finish(request_id, ending)
        req = RequestState(
            request_id, None, list(seq.prompt_token_ids), [seq], [None], queue_time=0.0
        )
        out = CompletionOutput(index=0)
        if first_logprobs is not None:
            out.logprobs = [tuple(first_logprobs)]
        req.outputs.append(out)
        if seq.is_finished:
            out.finish_reason, out.stop_reason = seq.finish_reason, seq.stop_reason
            self.guided.release(request_id)
            return req.snapshot()
        self._requests[request_id] = req
        self._seq_owner[seq.seq_id] = (req, 0)
        return None
