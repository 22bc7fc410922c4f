"""Guided decoding in one engine: a grammar matcher per constrained sequence, their token masks
for a step, and the compiled grammars they start from.

A matcher starts as a copy of its grammar's compiled template, kept in a bounded LRU cache keyed
by the constraint. A template not cached yet is compiled on a background thread (so is the
tokenizer the first time): the engine holds that request back and keeps stepping the others.
Sequences without a constraint are never looked at.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from baton.scheduler.sampling_params import SamplingParams
from baton.server.guided.grammar import check_grammar, grammar_for

logger = logging.getLogger(__name__)

Key = tuple[str, str, bool]


def key_of(params: SamplingParams) -> Key:
    return (params.guided, params.guided_spec, params.guided_compact)


class GuidedDecoding:
    def __init__(
        self, tokenizer_dir: Path | None, vocab_size: int, eos_token_ids: list[int], cache_size=64
    ) -> None:
        self._tokenizer_dir = tokenizer_dir
        self._vocab_size = vocab_size
        self._eos = [t for t in eos_token_ids if t is not None]
        self._cache_size = cache_size
        self._templates: OrderedDict[Key, object] = OrderedDict()  # compiled LLMatchers
        self._compiling: dict[Key, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._tokenizer = None
        self._executor = None  # llguidance's LLExecutor, for masks of many rows in parallel
        self._matchers: dict[str, object] = {}  # seq_id -> LLMatcher
        self._pending: dict[str, tuple[Key, list[int]]] = {}  # seq_id -> (key, tokens to replay)
        self.num_compiled = 0

    # ---- admission ----------------------------------------------------------------------------

    def check(self, params: SamplingParams) -> None:
        """ValueError naming the field if the constraint cannot be used (cheap: no tokenizer)."""
        if self._tokenizer_dir is None or not (self._tokenizer_dir / "tokenizer.json").is_file():
            raise ValueError("guided: this model has no tokenizer.json to constrain tokens with")
        key = key_of(params)
        if key not in self._templates:  # a cached one compiled: nothing to check
            check_grammar(grammar_for(*key))

    def start(self, seq_id: str, params: SamplingParams, replay: list[int]) -> None:
        """Give `seq_id` a matcher for its constraint, advanced over `replay` (tokens it already
        produced: a handed-over first token, a resumed request's output)."""
        key = key_of(params)
        self._pending[seq_id] = (key, list(replay))
        if key not in self._templates and key not in self._compiling:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
            self._compiling[key] = self._pool.submit(self._compile, key)

    def ready(self, seq_id: str, wait: bool = False) -> bool:
        """Whether `seq_id`'s matcher exists (`wait`: block until it does). A grammar that failed
        to compile raises ValueError here."""
        if seq_id in self._matchers:
            return True
        if seq_id not in self._pending:
            return False
        key, replay = self._pending[seq_id]
        fut = self._compiling.get(key)
        if fut is not None:
            if not wait and not fut.done():
                return False
            del self._compiling[key]
            try:
                self._remember(key, fut.result())
            except Exception as e:
                self._pending.pop(seq_id)
                raise e if isinstance(e, ValueError) else ValueError(f"guided: {e}") from e
        template = self._templates.get(key)
        if template is None:  # evicted since, or its compile failed for another sequence
            self._compiling[key] = self._pool.submit(self._compile, key)
            return self.ready(seq_id, wait)
        self._templates.move_to_end(key)
        del self._pending[seq_id]
        matcher = template.deep_copy()
        if replay and not matcher.consume_tokens(replay):
            raise ValueError(f"guided: the tokens so far leave the grammar ({matcher.get_error()})")
        self._matchers[seq_id] = matcher
        return True

    def sort_out(self, seqs: list, wait: bool) -> tuple[list, list]:
        """(ready, failed) among held sequences: those whose matcher exists now, and those
        whose grammar failed to compile (logged). `wait`: block on the first one."""
        ready, failed = [], []
        for i, seq in enumerate(seqs):
            try:
                if self.ready(seq.seq_id, wait=wait and i == 0):
                    ready.append(seq)
            except ValueError as e:
                logger.error("request %s: %s", seq.seq_id, e)
                failed.append(seq)
        return ready, failed

    def first_token(self, seq_id: str, token: int) -> str | None:
        """A handed-over sequence's first token, sampled under the grammar elsewhere: its
        matcher (waited for) takes it. The finish reason it leads to, if any: "abort" (the
        grammar failed to compile) or "stop" (the token completes it)."""
        try:
            self.ready(seq_id, wait=True)
        except ValueError as e:
            logger.error("request %s: %s", seq_id, e)
            return "abort"
        return "stop" if self.accept(seq_id, token) else None

    def release(self, seq_id: str) -> None:
        self._matchers.pop(seq_id, None)
        self._pending.pop(seq_id, None)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._matchers

    # ---- a step -------------------------------------------------------------------------------

    def bitmask(self, seq_ids: list[str]) -> tuple[list[int], torch.Tensor] | None:
        """(rows, int32 [len(rows), words]) for the constrained ones among `seq_ids`, or None."""
        rows = [i for i, sid in enumerate(seq_ids) if sid in self._matchers]
        if not rows:
            return None
        from llguidance.torch import fill_next_token_bitmask, fill_next_token_bitmask_par

        words = (self._vocab_size + 31) // 32
        mask = torch.empty((len(rows), words), dtype=torch.int32)
        matchers = [(self._matchers[seq_ids[i]], k) for k, i in enumerate(rows)]
        if len(matchers) == 1:
            fill_next_token_bitmask(matchers[0][0], mask, 0)
        else:
            fill_next_token_bitmask_par(self._executor, matchers, mask)
        return rows, mask

    def accept(self, seq_id: str, token: int) -> bool:
        """Advance `seq_id`'s matcher over the token it sampled; True when the grammar is done
        (nothing may follow: the sequence ends here)."""
        m = self._matchers.get(seq_id)
        if m is None:
            return False
        if not m.consume_token(token):
            logger.error("guided %s: token %d left the grammar: %s", seq_id, token, m.get_error())
            return True
        return m.is_stopped()

    # ---- compiling ----------------------------------------------------------------------------

    def _compile(self, key: Key):
        import llguidance

        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(
                str(self._tokenizer_dir / "tokenizer.json"),
                n_vocab=self._vocab_size,
                eos_token=self._eos or None,
            )
            self._executor = llguidance.LLExecutor()
        matcher = llguidance.LLMatcher(self._tokenizer, grammar_for(*key), log_level=0)
        if matcher.is_error():
            raise ValueError(f"guided_spec: {matcher.get_error()}")
        self.num_compiled += 1
        return matcher

    def _remember(self, key: Key, template) -> None:
        self._templates[key] = template
        self._templates.move_to_end(key)
        while len(self._templates) > self._cache_size:
            self._templates.popitem(last=False)
