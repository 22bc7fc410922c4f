from __future__ import annotations

import pytest

from baton.scheduler.batch import ScheduledBatch
from baton.scheduler.batcher import Batcher
from baton.scheduler.config import CacheConfig, SchedulerConfig
from baton.scheduler.sampling_params import SamplingParams
from baton.scheduler.sequence import Sequence, SequenceStatus

EOS = 2


def make_batcher(
    num_blocks=64,
    block_size=4,
    budget=64,
    max_num_seqs=8,
    max_model_len=256,
    chunked=True,
    prefix_caching=True,
) -> Batcher:
    return Batcher(
        SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            enable_chunked_prefill=chunked,
        ),
        CacheConfig(
            num_blocks=num_blocks, block_size=block_size, enable_prefix_caching=prefix_caching
        ),
    )


def make_seq(seq_id: str, prompt_len: int, first_token: int = 10, **params) -> Sequence:
    params.setdefault("max_tokens", 16)
    return Sequence(
        seq_id=seq_id,
        prompt_token_ids=[first_token + i for i in range(prompt_len)],
        params=SamplingParams(**params),
        eos_token_id=EOS,
    )


def step(b: Batcher, token: int = 5) -> tuple[ScheduledBatch, list[Sequence]]:
    batch = b.schedule()
    sampled = {s.seq_id: token for s, ok in zip(batch.seqs, batch.samples, strict=True) if ok}
    advanced = b.update(batch, sampled)
    b.block_manager.check_invariants(list(b.waiting) + b.running)
    return batch, advanced


def run_to_end(b: Batcher, token: int = 5, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not b.has_unfinished:
            return
        step(b, token)
    raise AssertionError("did not finish")


def test_chunked_prefill_splits_prompt_by_budget():
    b = make_batcher(budget=32)
    seq = make_seq("a", 100)
    b.add(seq)
    chunks = []
    for _ in range(4):
        batch, advanced = step(b)
        chunks.append(batch.num_new_tokens)
        assert batch.num_tokens <= 32
    assert chunks == [[32], [32], [32], [4]]
    assert advanced == [seq] and seq.output_token_ids == [5]
    batch, _ = step(b)
    assert batch.num_new_tokens == [1] and batch.num_decodes == 1


def test_without_chunking_a_prefill_that_does_not_fit_waits():
    b = make_batcher(budget=64, max_model_len=64, chunked=False)
    b.add(make_seq("a", 40, max_tokens=4))
    b.add(make_seq("b", 40, first_token=100, max_tokens=4))
    batch, _ = step(b)
    assert [s.seq_id for s in batch.seqs] == ["a"] and batch.num_new_tokens == [40]
    assert b.num_waiting == 1
    batch, _ = step(b)
    assert [s.seq_id for s in batch.seqs] == ["a", "b"] and batch.num_new_tokens == [1, 40]


def test_decodes_come_first():
    b = make_batcher(budget=32)
    a = make_seq("a", 40)
    one = make_seq("one", 1, first_token=99)  # a one-token prompt is decode-shaped
    b.add(a)
    b.add(one)
    batch, _ = step(b)
    assert batch.seqs == [a]
    batch, _ = step(b)
    assert batch.seqs == [one, a] and batch.num_new_tokens == [1, 8]
    assert batch.num_decodes == 1 and batch.num_prefills == 1


def test_prefix_hit_admission_skips_cached_tokens():
    b = make_batcher(block_size=4)
    a = make_seq("a", 13)
    b.add(a)
    step(b)
    c = make_seq("c", 14)  # same first 13 tokens
    b.add(c)
    batch, _ = step(b)
    assert batch.seqs == [a, c] and batch.num_new_tokens == [1, 2]
    assert c.num_cached_tokens == 12 and c.block_table[:3] == a.block_table[:3]
    assert b.block_manager.prefix_hits == 12


def test_preemption_takes_newest_and_readmits_it_first_with_recompute():
    b = make_batcher(num_blocks=6, block_size=2, budget=64, prefix_caching=False)
    a = make_seq("a", 4, max_tokens=2)
    bb = make_seq("b", 4, first_token=20, max_tokens=6)
    c = make_seq("c", 3, first_token=30, max_tokens=6)
    for s in (a, bb, c):
        b.add(s)
    batch, advanced = step(b)
    assert batch.seqs == [a, bb, c] and advanced == [a, bb, c]
    assert b.block_manager.num_free_blocks == 0

    batch, _ = step(b)  # a and b each need a third block: c, the newest, gives its blocks up
    assert batch.seqs == [a, bb] and batch.preempted == [c]
    assert c.status is SequenceStatus.WAITING and c.num_preemptions == 1
    assert c.num_computed_tokens == 0 and c.block_table == [] and c.output_token_ids == [5]
    assert a.finish_reason == "length"

    d = make_seq("d", 2, first_token=40, max_tokens=4)
    b.add(d)
    assert list(b.waiting) == [c, d]
    batch, _ = step(b)
    # c comes back before d and recomputes its prompt and its generated token.
    assert batch.seqs == [bb, c, d] and batch.num_new_tokens == [1, 4, 2]
    assert b.running == [bb, c, d]
    assert c.arrival < d.arrival
    run_to_end(b)
    assert b.block_manager.num_free_blocks == 6


def test_a_sequence_that_cannot_grow_preempts_itself():
    b = make_batcher(num_blocks=4, block_size=2, prefix_caching=False)
    a = make_seq("a", 3, max_tokens=4)  # 4 tokens after its first sample still fit 2 blocks
    bb = make_seq("b", 4, first_token=20, max_tokens=4)  # needs a third block to decode
    b.add(a)
    b.add(bb)
    step(b)
    batch, _ = step(b)
    assert batch.seqs == [a] and batch.preempted == [bb]
    assert list(b.waiting) == [bb] and b.running == [a]


def test_add_rejects_requests_that_can_never_fit():
    b = make_batcher(num_blocks=4, block_size=4, max_model_len=12)
    with pytest.raises(ValueError, match=r"prompt: 13 tokens exceed max_model_len \(12\)"):
        b.add(make_seq("a", 13, max_tokens=None))
    with pytest.raises(ValueError, match=r"20 tokens need 5 KV blocks.*only 4 blocks"):
        b.add(make_seq("b", 10, max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        b.add(make_seq("c", 0))
    b.add(make_seq("d", 8, max_tokens=8))
    with pytest.raises(ValueError, match="already"):
        b.add(make_seq("d", 8, max_tokens=8))
    assert b.num_waiting == 1 and b.block_manager.num_free_blocks == 4


def test_abort_waiting_and_running_frees_blocks():
    b = make_batcher(num_blocks=8, block_size=4, budget=16)
    run = make_seq("run", 10, max_tokens=4)
    wait = make_seq("wait", 14, first_token=50, max_tokens=4)
    b.add(run)
    step(b)
    b.add(wait)
    assert b.num_running == 1 and b.num_waiting == 1
    assert b.block_manager.num_free_blocks == 5
    assert b.abort("wait") is True
    assert wait.finish_reason == "abort" and wait.is_finished
    assert b.abort("run") is True
    assert run.status is SequenceStatus.FINISHED and run.block_table == []
    assert b.block_manager.num_free_blocks == 8
    assert not b.has_unfinished and b.get("run") is None
    assert b.abort("run") is False and b.abort("nope") is False
    assert b.finish("run", "stop") is False and run.finish_reason == "abort"


def test_abort_between_schedule_and_update_is_skipped():
    b = make_batcher()
    a = make_seq("a", 5)
    bb = make_seq("b", 5, first_token=40)
    b.add(a)
    b.add(bb)
    batch = b.schedule()
    b.abort("a")
    assert b.update(batch, {"a": 5, "b": 5}) == [bb]
    assert a.output_token_ids == [] and bb.output_token_ids == [5]
    b.block_manager.check_invariants([bb])


def test_eos_stops_and_min_tokens_suppresses_it():
    b = make_batcher()
    plain = make_seq("plain", 3)
    held = make_seq("held", 3, first_token=40, min_tokens=3)
    b.add(plain)
    b.add(held)
    _, advanced = step(b, token=EOS)
    assert advanced == [plain, held]
    assert plain.finish_reason == "stop" and plain.stop_reason == EOS
    assert not held.is_finished
    step(b, token=EOS)
    assert not held.is_finished
    step(b, token=EOS)
    assert held.finish_reason == "stop" and held.output_token_ids == [EOS] * 3
    assert b.block_manager.num_free_blocks == b.block_manager.num_blocks


def test_stop_token_ids_and_ignore_eos():
    b = make_batcher()
    stopper = make_seq("stopper", 3, stop_token_ids=[7])
    ignorer = make_seq("ignorer", 3, first_token=40, ignore_eos=True, max_tokens=4)
    b.add(stopper)
    b.add(ignorer)
    step(b, token=9)
    assert not stopper.is_finished and not ignorer.is_finished
    step(b, token=7)
    assert stopper.finish_reason == "stop" and stopper.stop_reason == 7
    run_to_end(b, token=EOS)
    assert ignorer.finish_reason == "length" and ignorer.stop_reason is None
    assert ignorer.output_token_ids == [9, 7, EOS, EOS]


def test_max_tokens_and_max_model_len_finish_with_length():
    b = make_batcher(max_model_len=8)
    capped = make_seq("capped", 3, max_tokens=2)
    unbounded = make_seq("unbounded", 6, first_token=40, max_tokens=None)
    unsettled = make_seq("unsettled", 5, first_token=60, max_tokens=10)  # past max_model_len
    for seq in (capped, unbounded, unsettled):
        b.add(seq)
    run_to_end(b)
    assert capped.finish_reason == "length" and capped.num_output_tokens == 2
    assert unbounded.finish_reason == "length" and unbounded.num_tokens == 8
    assert unsettled.finish_reason == "length" and unsettled.num_tokens == 8


def test_finish_by_engine_on_stop_string():
    b = make_batcher()
    a = make_seq("a", 3)
    b.add(a)
    step(b)
    assert b.get("a") is a
    assert b.finish("a", "stop", stop_reason="###") is True
    assert (a.finish_reason, a.stop_reason) == ("stop", "###")
    assert not b.has_unfinished and b.block_manager.num_free_blocks == b.block_manager.num_blocks


def test_missing_sample_is_an_error():
    b = make_batcher()
    b.add(make_seq("a", 3))
    batch = b.schedule()
    with pytest.raises(KeyError, match="'a'"):
        b.update(batch, {})


def test_max_num_seqs_limits_admission():
    b = make_batcher(max_num_seqs=2)
    for i in range(3):
        b.add(make_seq(f"s{i}", 3, first_token=10 * i + 10))
    batch, _ = step(b)
    assert [s.seq_id for s in batch.seqs] == ["s0", "s1"]
    assert b.num_running == 2 and b.num_waiting == 1


def test_detached_sequence_keeps_its_blocks_until_released():
    b = make_batcher()
    b.add(make_seq("a", 9))
    step(b)  # the whole prompt, first token sampled
    seq = b.detach("a")
    assert not b.running and not b.has_unfinished and seq.finish_reason == "handoff"
    assert b.block_manager.num_used_blocks == 3
    b.block_manager.check_invariants([*b.live_seqs, seq])
    b.free(seq)
    assert b.block_manager.num_used_blocks == 0


def test_reserved_sequence_joins_the_batch_on_commit():
    b = make_batcher(num_blocks=4)
    a = make_seq("a", 9, max_tokens=4)
    assert b.reserve(a)  # 3 blocks now, 4 at most
    assert not b.reserve(make_seq("b", 9, max_tokens=4))  # not now, and it holds nothing
    assert b.block_manager.num_used_blocks == 3
    b.block_manager.check_invariants([*b.live_seqs, a])
    seq = b.join(a, first_token=7)
    assert seq.num_computed_tokens == 9 and seq.output_token_ids == [7]
    batch, advanced = step(b)
    assert batch.num_new_tokens == [1] and advanced == [seq]  # decodes straight away
    run_to_end(b)
    assert b.block_manager.num_used_blocks == 0


def test_freed_reservation_holds_nothing():
    b = make_batcher()
    a = make_seq("a", 9)
    assert b.reserve(a)
    b.free(a)
    assert b.block_manager.num_used_blocks == 0
    with pytest.raises(ValueError, match="260 tokens need 65 KV blocks"):
        b.reserve(make_seq("big", 250, max_tokens=10))


def test_a_reservation_shares_the_cached_prefix_and_refcounts_stay_right():
    """Decode-side reuse: the reserved prompt takes the blocks this cache holds (shared with a
    running sequence), allocates only the rest, and freeing either leaves the other intact."""
    b = make_batcher(num_blocks=16)
    b.add(make_seq("a", 9, max_tokens=8))  # tokens 10..18: blocks of 4
    step(b)
    a = b.running[0]
    seq = make_seq("r", 13, max_tokens=4)  # the same first 9 tokens, then more
    assert b.reserve(seq)
    assert seq.num_cached_tokens == 8 and seq.block_table[:2] == a.block_table[:2]
    bm = b.block_manager
    assert [bm.ref_counts[x] for x in seq.block_table[:2]] == [2, 2]
    bm.check_invariants([*b.live_seqs, seq])
    b.free(seq)  # the handoff was aborted: a's blocks are untouched
    assert [bm.ref_counts[x] for x in a.block_table[:2]] == [1, 1]
    bm.check_invariants(b.live_seqs)
    run_to_end(b)
    assert bm.num_used_blocks == 0
