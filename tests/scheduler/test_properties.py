"""Randomized checks of the scheduling core against a fake KV cache that records what was written.

Tiny caches, small block sizes and a small vocabulary make prefix hits, evictions and preemptions
common; every operation is followed by the allocator's and the batcher's invariants.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from baton.scheduler.batcher import Batcher
from baton.scheduler.block_manager import BlockManager, compute_block_hashes
from baton.scheduler.config import CacheConfig, SchedulerConfig
from baton.scheduler.sampling_params import SamplingParams
from baton.scheduler.sequence import Sequence, SequenceStatus

EOS = 2
VOCAB = 4
RARE = 3  # sampled as rarely as EOS; some sequences stop on it
tokens_st = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)


def sample_token(rng) -> int:
    # NOTE: stops must be rare, or sequences never live long enough to contend for blocks.
    r = rng.random()
    return EOS if r < 0.03 else RARE if r < 0.06 else rng.choice([0, 1])


class BatcherMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([2, 4, 16]),
        num_blocks=st.integers(1, 12),
        budget=st.integers(1, 48),
        max_num_seqs=st.integers(1, 4),
        max_model_len=st.integers(2, 64),
        chunked=st.booleans(),
        prefix_caching=st.booleans(),
    )
    def setup(
        self, block_size, num_blocks, budget, max_num_seqs, max_model_len, chunked, prefix_caching
    ):
        if not chunked:
            budget = max(budget, max_model_len)
        self.sched = SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            enable_chunked_prefill=chunked,
        )
        self.cache = CacheConfig(
            num_blocks=num_blocks, block_size=block_size, enable_prefix_caching=prefix_caching
        )
        self.b = Batcher(self.sched, self.cache)
        self.bm = self.b.block_manager
        self.seqs: dict[str, Sequence] = {}
        self.kv: dict[int, list[int | None]] = {i: [None] * block_size for i in range(num_blocks)}
        self.next_id = 0

    def live(self) -> list[Sequence]:
        return list(self.b.waiting) + self.b.running

    def _add(self, prompt, max_tokens, min_tokens, ignore_eos, stop_ids):
        if max_tokens is not None:
            min_tokens = min(min_tokens, max_tokens)
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            ignore_eos=ignore_eos,
            stop_token_ids=stop_ids,
        )
        seq = Sequence(
            seq_id=f"s{self.next_id}",
            prompt_token_ids=list(prompt),
            params=params,
            eos_token_id=EOS,
        )
        self.next_id += 1
        # NOTE: only capacity: the length rule is settled before a request reaches a batcher.
        total = len(prompt) + (max_tokens or 0)
        prompt_fits = len(prompt) <= self.sched.max_model_len
        fits = prompt_fits and -(-total // self.cache.block_size) <= self.cache.num_blocks
        try:
            self.b.add(seq)
        except ValueError as e:
            assert not fits, e
            assert str(total if prompt_fits else len(prompt)) in str(e)
            return
        assert fits
        assert seq.status is SequenceStatus.WAITING and self.b.get(seq.seq_id) is seq
        self.seqs[seq.seq_id] = seq

    def capacity(self) -> int:
        return min(self.sched.max_model_len, self.cache.num_blocks * self.cache.block_size)

    @rule(
        data=st.data(),
        min_tokens=st.integers(0, 3),
        ignore_eos=st.booleans(),
        stop_ids=st.lists(st.sampled_from([RARE, VOCAB]), max_size=1),
    )
    def add(self, data, min_tokens, ignore_eos, stop_ids):
        cap = self.capacity()
        n = data.draw(st.integers(1, cap), label="prompt_len")
        prompt = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
        max_tokens = data.draw(st.none() | st.integers(1, max(1, cap - n)), label="max_tokens")
        self._add(prompt, max_tokens, min_tokens, ignore_eos, stop_ids)

    @rule(prompt=tokens_st, max_tokens=st.none() | st.integers(1, 64))
    def add_maybe_oversized(self, prompt, max_tokens):
        self._add(prompt, max_tokens, 0, False, [])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), tail=st.lists(st.integers(0, VOCAB - 1), max_size=8))
    def add_sharing_prefix(self, data, tail):
        """A prompt that starts like an earlier sequence (its generated tokens included)."""
        other = data.draw(st.sampled_from(sorted(self.seqs)))
        tokens = self.seqs[other].token_ids
        cut = data.draw(st.integers(1, len(tokens)))
        prompt = (tokens[:cut] + tail)[: self.capacity()]
        max_tokens = data.draw(st.integers(1, max(1, self.capacity() - len(prompt))))
        self._add(prompt, max_tokens, 0, False, [])

    @rule(rng=st.randoms(use_true_random=False), num_steps=st.integers(1, 4))
    def step(self, rng, num_steps):
        for _ in range(num_steps):
            self._step(rng)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def abort(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.seqs) + ["unknown"]))
        seq = self.seqs.get(seq_id)
        was_live = seq is not None and not seq.is_finished
        assert self.b.abort(seq_id) is was_live
        if was_live:
            assert seq.is_finished and seq.finish_reason == "abort" and seq.block_table == []

    @precondition(lambda self: self.b.running)
    @rule(data=st.data())
    def finish_on_stop_string(self, data):
        seq = data.draw(st.sampled_from(self.b.running))
        assert self.b.finish(seq.seq_id, "stop", stop_reason="stop-string")
        assert seq not in self.b.running and seq.finish_reason == "stop"

    def _step(self, rng) -> None:
        b, bm, bs = self.b, self.bm, self.cache.block_size
        live = self.live()
        oldest = min(live, key=lambda s: s.arrival) if live else None
        was_waiting = {id(s) for s in b.waiting}
        before = {s.seq_id: s.num_output_tokens for s in live}

        batch = b.schedule()
        seqs, ns = batch.seqs, batch.num_new_tokens
        assert len(seqs) == len(ns) == len({id(s) for s in seqs})
        assert batch.num_tokens <= self.sched.max_num_batched_tokens
        assert len(seqs) <= self.sched.max_num_seqs
        assert len(b.running) <= self.sched.max_num_seqs
        if oldest is not None:
            assert oldest in seqs, "the oldest unfinished sequence must advance every step"
        for i, (seq, n) in enumerate(zip(seqs, ns, strict=True)):
            assert seq.status is SequenceStatus.RUNNING and seq in b.running
            assert 1 <= n <= seq.num_uncomputed_tokens
            assert (i < batch.num_decodes) == (seq.num_uncomputed_tokens == 1)
            if not self.sched.enable_chunked_prefill:
                assert n == seq.num_uncomputed_tokens
            assert len(seq.block_table) * bs >= seq.num_computed_tokens + n
        if batch.preempted:
            assert not any(id(s) in was_waiting for s in seqs), "admitted despite preemption"
        for seq in batch.preempted:
            assert seq in b.waiting and seq not in seqs
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        arrivals = [s.arrival for s in b.running]
        assert arrivals == sorted(arrivals)
        if b.running and b.waiting:
            assert max(arrivals) < min(s.arrival for s in b.waiting)
        self._check_sharing()

        # The "model": check what is cached, then write this step's K/V.
        for seq, n in zip(seqs, ns, strict=True):
            tokens = seq.token_ids
            for pos in range(seq.num_computed_tokens):
                block = seq.block_table[pos // bs]
                assert self.kv[block][pos % bs] == tokens[pos], f"stale KV for {seq.seq_id}"
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                block = seq.block_table[pos // bs]
                assert bm.ref_counts[block] == 1, "writing into a shared block"
                self.kv[block][pos % bs] = tokens[pos]
        samplers = [s for s, ok in zip(seqs, batch.samples, strict=True) if ok]
        sampled = {s.seq_id: sample_token(rng) for s in samplers}
        aborted = None
        if seqs and rng.random() < 0.05:  # the engine aborts a request while the model runs
            aborted = rng.choice(seqs)
            b.abort(aborted.seq_id)

        advanced = b.update(batch, sampled)
        assert advanced == [s for s in samplers if s is not aborted]
        for seq in advanced:
            assert seq.num_output_tokens == before[seq.seq_id] + 1
            assert seq.output_token_ids[-1] == sampled[seq.seq_id]
            assert seq.num_uncomputed_tokens == 1
            if seq.is_finished:
                assert seq.block_table == [] and seq not in b.running
        for seq in self.seqs.values():
            params = seq.params
            if params.max_tokens is not None:
                assert seq.num_output_tokens <= params.max_tokens
            assert seq.num_tokens <= max(self.sched.max_model_len, seq.num_prompt_tokens + 1)
            if seq.finish_reason == "stop" and isinstance(seq.stop_reason, int):
                assert seq.num_output_tokens >= params.min_tokens
                assert seq.stop_reason in params.stop_token_ids or (
                    seq.stop_reason == EOS and not params.ignore_eos
                )

    def _check_sharing(self) -> None:
        bs = self.cache.block_size
        holders = Counter(b for s in self.b.running for b in s.block_table)
        for seq in self.b.running:
            for i, block in enumerate(seq.block_table):
                if holders[block] > 1:
                    assert self.bm.block_hashes[block] is not None
                    assert (i + 1) * bs <= seq.num_computed_tokens

    @invariant()
    def consistent(self):
        if not hasattr(self, "b"):
            return
        live = self.live()
        self.bm.check_invariants(live)
        assert self.b.has_unfinished == bool(live)
        assert all(s.block_table == [] for s in self.b.waiting)
        assert all(s.status is SequenceStatus.WAITING for s in self.b.waiting)
        assert 0.0 <= self.bm.usage <= 1.0
        assert self.bm.prefix_hits <= self.bm.prefix_queries

    def teardown(self):
        if not hasattr(self, "b"):
            return
        rng = random.Random(0)
        for _ in range(10_000):
            if not self.b.has_unfinished:
                break
            self._step(rng)
            self.consistent()
        assert not self.b.has_unfinished, "requests left unfinished after 10000 steps"
        assert all(s.is_finished for s in self.seqs.values())
        assert self.bm.num_free_blocks == self.cache.num_blocks, "leaked blocks"
        self.bm.check_invariants([])


TestBatcherMachine = BatcherMachine.TestCase
TestBatcherMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


@settings(max_examples=200, deadline=None)
@given(
    block_size=st.sampled_from([2, 4]),
    num_blocks=st.integers(2, 10),
    budget=st.integers(1, 24),
    max_num_seqs=st.integers(2, 6),
    prefix_caching=st.booleans(),
    base=st.lists(st.integers(0, VOCAB - 1), min_size=8, max_size=8),
    requests=st.lists(
        st.tuples(st.integers(0, 8), st.integers(0, 4), st.integers(1, 40)),
        min_size=2,
        max_size=8,
    ),
)
def test_contended_cache_preempts_and_finishes_everything(
    block_size, num_blocks, budget, max_num_seqs, prefix_caching, base, requests
):
    """Many long requests at once on a cache too small for all of them: preemption is the rule."""
    m = BatcherMachine()
    m.setup(block_size, num_blocks, budget, max_num_seqs, 64, True, prefix_caching)
    cap = m.capacity()
    for shared, own, max_tokens in requests:
        prompt = (base[:shared] + [1] * own)[: cap - 1] or [0]
        m._add(prompt, min(max_tokens, cap - len(prompt)), 0, True, [])
        m.consistent()
    m.teardown()


@settings(max_examples=200, deadline=None)
@given(
    first=tokens_st,
    second=tokens_st,
    block_size=st.sampled_from([1, 2, 4]),
)
def test_match_prefix_finds_longest_common_full_block_prefix(first, second, block_size):
    bm = BlockManager(num_blocks=64, block_size=block_size)
    a = Sequence(seq_id="a", prompt_token_ids=first, params=SamplingParams())
    bm.match_prefix(a)
    assert bm.allocate_slots(a, a.num_uncomputed_tokens)
    a.num_computed_tokens = a.num_tokens
    bm.cache_full_blocks(a)

    b = Sequence(seq_id="b", prompt_token_ids=second, params=SamplingParams())
    common = 0
    for ha, hb in zip(
        compute_block_hashes(first, block_size),
        compute_block_hashes(second, block_size),
        strict=False,
    ):
        if ha != hb:
            break
        common += 1
    expected = min(common, (len(second) - 1) // block_size) * block_size
    assert bm.match_prefix(b) == expected
    assert first[:expected] == second[:expected]
    assert b.block_table == a.block_table[: expected // block_size]
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    bm.check_invariants([])
    assert bm.num_free_blocks == 64
