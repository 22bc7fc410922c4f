"""Continuous batching with chunked prefill and recompute preemption (pure Python)."""

from __future__ import annotations

import itertools
from collections import deque

from baton.scheduler.batch import ScheduledBatch
from baton.scheduler.block_manager import BlockManager
from baton.scheduler.config import CacheConfig, SchedulerConfig
from baton.scheduler.sequence import Sequence, SequenceStatus


class Batcher:
    """Decides which sequences advance by how many tokens each step, and applies the results.

    NOTE: every running sequence is older than every waiting one, and `running` is kept oldest
    first. Blocks are given out oldest first and, when they run short, taken back from the newest
    running sequence, so the oldest unfinished request advances every step (no starvation).
    Waiting sequences hold no blocks.
    """

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.block_manager = BlockManager(
            cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._seqs: dict[str, Sequence] = {}  # unfinished sequences by id
        self._arrivals = itertools.count(1)
        self.num_preemptions = 0  # total over the batcher's life, for metrics and tests
        # NOTE: a sequence cannot outgrow the cache; this only binds requests without max_tokens.
        self._max_len = min(
            scheduler_config.max_model_len, cache_config.num_blocks * cache_config.block_size
        )

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def live_seqs(self) -> list[Sequence]:
        """The batch's sequences (for invariant checks; handed-off ones are held elsewhere)."""
        return [*self.waiting, *self.running]

    def get(self, seq_id: str) -> Sequence | None:
        """The unfinished sequence with this id, if any."""
        return self._seqs.get(seq_id)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raises ValueError, changing nothing, if it could never fit."""
        self.check(seq)
        seq.arrival = next(self._arrivals)
        seq.status = SequenceStatus.WAITING
        self._seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def check(self, seq: Sequence) -> None:
        """ValueError, changing nothing, if `seq` could never run here."""
        if seq.seq_id in self._seqs:
            raise ValueError(f"seq_id: {seq.seq_id!r} is already scheduled")
        if not seq.prompt_token_ids:
            raise ValueError("prompt: must not be empty")
        # NOTE: capacity only. The length rule (scheduler.limits) is settled where a request
        # arrives (the router, the engine); past max_model_len a sequence ends with "length".
        # Its prompt must fit, though: without chunking a longer one would never be scheduled.
        max_len = self.scheduler_config.max_model_len
        if seq.num_prompt_tokens > max_len:
            raise ValueError(
                f"prompt: {seq.num_prompt_tokens} tokens exceed max_model_len ({max_len}), "
                f"the longest sequence a step runs"
            )
        total = seq.num_prompt_tokens + (seq.params.max_tokens or 0)
        blocks = self.block_manager.blocks_needed(total)
        if blocks > self.cache_config.num_blocks:
            raise ValueError(
                f"{total} tokens need {blocks} KV blocks of {self.cache_config.block_size} tokens, "
                f"but the cache has only {self.cache_config.num_blocks} blocks"
            )

    # ---- disaggregation: sequences whose blocks are held outside the batch ----------------------
    # NOTE: the batch only moves blocks here; who holds such a sequence, and until when, is
    # `baton.server.handoffs.Handoffs`' to say.

    def detach(self, seq_id: str) -> Sequence:
        """Take a running sequence out of the batch but keep its blocks (its KV is being shipped);
        `free` frees them. It counts as finished here."""
        seq = self._seqs.pop(seq_id)
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "handoff"
        return seq

    def reserve(self, seq: Sequence) -> bool:
        """Allocate blocks, outside the batch, for a prompt whose KV will arrive from elsewhere;
        the leading blocks this cache already holds are shared, not allocated (their count is
        `seq.num_cached_tokens // block_size`: the sender skips them). Raises ValueError if it
        could never fit; returns False, holding nothing, if the blocks are not free now."""
        self.check(seq)
        self.block_manager.match_prefix(seq)
        if not self.block_manager.allocate_slots(seq, seq.num_uncomputed_tokens):
            self.block_manager.free(seq)
            seq.num_computed_tokens = seq.num_cached_tokens = 0
            return False
        seq.status = SequenceStatus.WAITING
        return True

    def join(self, seq: Sequence, first_token: int) -> Sequence:
        """A reserved prompt's KV has arrived: it joins the batch with its first token sampled."""
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.block_manager.cache_full_blocks(seq)
        seq.output_token_ids.append(first_token)
        seq.arrival = next(self._arrivals)
        seq.status = SequenceStatus.RUNNING
        self._seqs[seq.seq_id] = seq
        self.running.append(seq)  # the newest running sequence
        self._check_stop(seq, first_token)
        return seq

    def free(self, seq: Sequence) -> None:
        """Free the blocks of a sequence held outside the batch (detached or reserved)."""
        self.block_manager.free(seq)

    def _num_to_schedule(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_uncomputed_tokens, budget)
        if n < seq.num_uncomputed_tokens and not self.scheduler_config.enable_chunked_prefill:
            return 0  # without chunking, a prefill runs whole or waits
        return n

    def _preempt_newest(self) -> Sequence:
        victim = self.running.pop()
        self.block_manager.free(victim)
        victim.num_computed_tokens = 0
        victim.status = SequenceStatus.WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)  # the oldest waiting one, so readmitted first
        return victim

    def schedule(self) -> ScheduledBatch:
        """Pick this step's sequences: running ones oldest first, then admit waiting ones."""
        budget = self.scheduler_config.max_num_batched_tokens
        bm = self.block_manager
        decodes: list[tuple[Sequence, int]] = []
        prefills: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._num_to_schedule(seq, budget)
            if n == 0:
                i += 1
                continue
            while not bm.allocate_slots(seq, n):
                victim = self._preempt_newest()
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                (decodes if seq.num_uncomputed_tokens == 1 else prefills).append((seq, n))
                budget -= n
                i += 1
                continue
            break  # `seq` preempted itself: nothing behind it is left to run

        max_seqs = self.scheduler_config.max_num_seqs
        while not preempted and self.waiting and budget > 0 and len(self.running) < max_seqs:
            seq = self.waiting[0]
            bm.match_prefix(seq)
            n = self._num_to_schedule(seq, budget)
            if n == 0 or not bm.allocate_slots(seq, n):
                bm.free(seq)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            (decodes if seq.num_uncomputed_tokens == 1 else prefills).append((seq, n))
            budget -= n

        scheduled = decodes + prefills
        return ScheduledBatch(
            seqs=[s for s, _ in scheduled],
            num_new_tokens=[n for _, n in scheduled],
            num_decodes=len(decodes),
            preempted=preempted,
        )

    def update(self, batch: ScheduledBatch, sampled: dict[str, int]) -> list[Sequence]:
        """Apply a step's results; returns the sequences that got a new token, in batch order."""
        advanced: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # finished or aborted since it was scheduled
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                continue
            if seq.seq_id not in sampled:
                raise KeyError(f"no sampled token for {seq.seq_id!r}, which reached its end")
            token = sampled[seq.seq_id]
            seq.output_token_ids.append(token)
            advanced.append(seq)
            self._check_stop(seq, token)
        return advanced

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens and (
            token in params.stop_token_ids or (token == seq.eos_token_id and not params.ignore_eos)
        ):
            self.finish(seq.seq_id, "stop", stop_reason=token)
        elif (
            params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens
        ) or seq.num_tokens >= self._max_len:
            self.finish(seq.seq_id, "length")

    def finish(self, seq_id: str, reason: str, stop_reason: int | str | None = None) -> bool:
        """End a waiting or running sequence and free its blocks; False if it is not unfinished."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return False
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        return True

    def abort(self, seq_id: str) -> bool:
        return self.finish(seq_id, "abort")
