"""Batched sampling: penalties, min_tokens, temperature, top-k/top-p/min-p and seeded draws."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.scheduler.sequence import Sequence
from baton.server.guided.bitmask import apply_bitmask


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # of the chosen token, under the raw model distribution
    top_logprobs: list[tuple[int, float]] | None = None  # best first; [] when logprobs == 0


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # NOTE: a pinned staging copy keeps the upload asynchronous, so it never waits on the GPU.
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Per-row index of the maximum (the first one on ties, as argmax).

    NOTE: on CPU, max over the last dim ran 2.6x faster than argmax over a [64, 49152] batch of
    logits (0.9 vs 2.4 ms); same result.
    """
    return x.max(dim=-1).indices


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _upload(torch.tensor(values, dtype=dtype), device)


def token_counts(
    token_lists: list[list[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Occurrences of each token id per row, as float [N, V]; ids outside [0, V) are ignored."""
    n = len(token_lists)
    flat = torch.cat([torch.tensor(t, dtype=torch.long) for t in token_lists])
    rows = torch.repeat_interleave(
        torch.arange(n), torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    )
    # NOTE: out-of-range ids land in a spare column per row that is dropped below.
    flat = torch.where((flat >= 0) & (flat < vocab_size), flat, vocab_size)
    index = _upload(rows * (vocab_size + 1) + flat, device)
    counts = torch.zeros(n * (vocab_size + 1), dtype=torch.float32, device=device)
    counts.scatter_add_(0, index, torch.ones(index.shape, dtype=torch.float32, device=device))
    return counts.view(n, vocab_size + 1)[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor | None,
) -> torch.Tensor:
    """Presence/frequency penalties over the output tokens (OpenAI), and the repetition penalty
    over prompt + output tokens (HF: positive logits are divided, others multiplied).

    `repetition` may be None when no row has one; the prompt is then not scanned.
    """
    # logits: [N, V]; presence, frequency, repetition: [N]
    vocab = logits.shape[1]
    out_counts = token_counts(output_ids, vocab, logits.device)
    out_seen = out_counts > 0
    if repetition is not None:
        seen = out_seen | (token_counts(prompt_ids, vocab, logits.device) > 0)
        rep = repetition[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * out_counts - presence[:, None] * out_seen


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Masks to -inf what top-k and then top-p drop, with one sort for the batch.

    top_k: [N] long, V where disabled; top_p: [N] float, 1.0 where disabled. Ties at the k-th
    value are all kept; the most likely token always survives top-p.
    """
    # logits: [N, V]
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k.clamp(1, vocab))[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1.0 - top_p)[:, None]
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keeps tokens whose probability is at least min_p times the largest one."""
    # logits: [N, V]; min_p: [N], 0.0 where disabled (log 0 = -inf keeps everything)
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log()[:, None]
    return logits.masked_fill(logits < threshold, float("-inf"))


class Sampler:
    """Picks one token per row. Rows differ in their parameters; tensors stay on the logits'
    device and the only host sync is the final copy of the results.

    A row with a seed draws from its own generator, kept per seq_id until `release`, so the same
    seed gives the same tokens whatever else is in the batch.
    """

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def release(self, seq_id: str) -> None:
        self._generators.pop(seq_id, None)

    def _generator(self, seq: Sequence, row: torch.Tensor) -> torch.Generator:
        """The seeded generator of `seq`, which draws `row`'s shape, dtype and device."""
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=row.device)
            gen.manual_seed(seq.params.seed)
            # NOTE: a sequence taken over with tokens already drawn (a decode worker after the
            # KV handoff) skips the draws those tokens used, so a seed gives the same stream
            # whether one worker or two sampled it. Each sampled token draws one row.
            for _ in range(seq.num_output_tokens):
                torch.empty_like(row).exponential_(generator=gen)
            self._generators[seq.seq_id] = gen
        return gen

    def __call__(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        allowed: tuple[list[int], torch.Tensor] | None = None,
    ) -> list[SampleResult]:
        """`allowed`: (rows, bitmask) of the constrained rows (see baton.server.guided)."""
        # logits: [N, V]
        n, vocab = logits.shape
        assert n == len(seqs), f"{n} rows of logits for {len(seqs)} sequences"
        device = logits.device
        logits = logits.float()
        params = [s.params for s in seqs]

        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = None
        if lp_rows:
            raw = logits if len(lp_rows) == n else logits[_to_device(lp_rows, torch.long, device)]
            raw_logprobs = torch.log_softmax(raw, dim=-1)

        logits = self._penalize(logits, seqs)
        logits = self._mask_min_tokens(logits, seqs)
        if allowed is not None:
            rows, bitmask = allowed
            logits = apply_bitmask(logits, _to_device(rows, torch.long, device), bitmask)

        sample_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not sample_rows:
            tokens = _argmax(logits)
        elif len(sample_rows) == n:
            tokens = self._sample(logits, seqs)
        else:
            idx = _to_device(sample_rows, torch.long, device)
            sampled = self._sample(logits[idx], [seqs[i] for i in sample_rows])
            tokens = _argmax(logits).index_copy(0, idx, sampled)

        return self._results(tokens, raw_logprobs, lp_rows, params)

    def _penalize(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if not rows:
            return logits
        sub_seqs = [seqs[i] for i in rows]
        device = logits.device
        presence = _to_device([s.params.presence_penalty for s in sub_seqs], torch.float32, device)
        frequency = _to_device(
            [s.params.frequency_penalty for s in sub_seqs], torch.float32, device
        )
        reps = [s.params.repetition_penalty for s in sub_seqs]
        repetition = (
            _to_device(reps, torch.float32, device) if any(r != 1.0 for r in reps) else None
        )
        prompts = [s.prompt_token_ids for s in sub_seqs] if repetition is not None else []
        outputs = [s.output_token_ids for s in sub_seqs]
        if len(rows) == len(seqs):
            return apply_penalties(logits, prompts, outputs, presence, frequency, repetition)
        idx = _to_device(rows, torch.long, device)
        sub = apply_penalties(logits[idx], prompts, outputs, presence, frequency, repetition)
        return logits.index_copy(0, idx, sub)

    def _mask_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """While a sequence is short of min_tokens, EOS and its stop token ids cannot be drawn."""
        vocab = logits.shape[1]
        rows: list[int] = []
        cols: list[int] = []
        for i, s in enumerate(seqs):
            p = s.params
            if s.num_output_tokens >= p.min_tokens or p.guided:  # a grammar says when it ends
                continue
            banned = set(p.stop_token_ids)
            if s.eos_token_id is not None and not p.ignore_eos:
                banned.add(s.eos_token_id)
            for t in banned:
                if 0 <= t < vocab:
                    rows.append(i)
                    cols.append(t)
        if not rows:
            return logits
        index = (
            _to_device(rows, torch.long, logits.device),
            _to_device(cols, torch.long, logits.device),
        )
        return logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Temperature, top-k/top-p, min-p, then one draw per row: argmax(probs / q), q ~ Exp(1)."""
        # logits: [M, V], every row non-greedy
        m, vocab = logits.shape
        device = logits.device
        params = [s.params for s in seqs]
        if any(p.temperature != 1.0 for p in params):
            temps = _to_device([p.temperature for p in params], torch.float32, device)
            logits = logits / temps[:, None]

        cut_rows = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
        if cut_rows:
            cut = [params[i] for i in cut_rows]
            top_k = (
                _to_device([p.top_k or vocab for p in cut], torch.long, device)
                if any(p.top_k > 0 for p in cut)
                else None
            )
            top_p = (
                _to_device([p.top_p for p in cut], torch.float32, device)
                if any(p.top_p < 1.0 for p in cut)
                else None
            )
            if len(cut_rows) == m:
                logits = apply_top_k_top_p(logits, top_k, top_p)
            else:
                idx = _to_device(cut_rows, torch.long, device)
                logits = logits.index_copy(0, idx, apply_top_k_top_p(logits[idx], top_k, top_p))

        if any(p.min_p > 0.0 for p in params):
            logits = apply_min_p(
                logits, _to_device([p.min_p for p in params], torch.float32, device)
            )

        probs = logits.softmax(dim=-1)
        q = torch.empty_like(probs)
        if any(p.seed is None for p in params):
            q.exponential_()
        for i, s in enumerate(seqs):
            if s.params.seed is not None:
                q[i].exponential_(generator=self._generator(s, q[i]))
        # NOTE: a zero draw would turn a masked token's 0/0 into NaN, which argmax would pick.
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return _argmax(probs / q)

    def _results(
        self,
        tokens: torch.Tensor,
        raw_logprobs: torch.Tensor | None,
        lp_rows: list[int],
        params: list,
    ) -> list[SampleResult]:
        results = [SampleResult(token_id=t) for t in tokens.tolist()]
        if raw_logprobs is None:
            return results
        device = tokens.device
        chosen_ids = (
            tokens
            if len(lp_rows) == len(params)
            else tokens[_to_device(lp_rows, torch.long, device)]
        )
        chosen = raw_logprobs.gather(1, chosen_ids[:, None]).squeeze(1).tolist()
        max_k = min(max(params[i].logprobs for i in lp_rows), raw_logprobs.shape[1])
        top_vals: list[list[float]] = [[] for _ in lp_rows]
        top_ids: list[list[int]] = [[] for _ in lp_rows]
        if max_k > 0:
            vals, ids = raw_logprobs.topk(max_k, dim=-1)
            top_vals, top_ids = vals.tolist(), ids.tolist()
        for j, i in enumerate(lp_rows):
            k = params[i].logprobs
            results[i].logprob = chosen[j]
            results[i].top_logprobs = list(zip(top_ids[j][:k], top_vals[j][:k], strict=True))
        return results
