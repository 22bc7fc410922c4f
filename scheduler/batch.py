"""What one engine step computes: the batcher's output and the model runner's input."""

from __future__ import annotations

from dataclasses import dataclass, field

from baton.scheduler.sequence import Sequence


@dataclass
class ScheduledBatch:
    """Sequences to advance this step and how many new tokens each computes.

    NOTE: decodes (one token left to compute) come first, then prefills and prefill chunks; the
    model runner relies on that order. Counts that read `num_computed_tokens` (`samples`) are only
    meaningful before `Batcher.update` applies the step.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_decodes: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def num_prefills(self) -> int:
        return len(self.seqs) - self.num_decodes

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def samples(self) -> list[bool]:
        """Per sequence: whether this step reaches its last known token and so samples one."""
        return [
            s.num_computed_tokens + n == s.num_tokens
            for s, n in zip(self.seqs, self.num_new_tokens, strict=True)
        ]
