"""One request in the engine: its n sequences, and what it has returned of each."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from baton.scheduler.sampling_params import SamplingParams
from baton.scheduler.sequence import Sequence
from baton.server.detokenizer import IncrementalDetokenizer
from baton.server.outputs import CompletionOutput, RequestOutput


@dataclass
class RequestState:
    """One request in the engine: its n sequences, and what it has returned of each."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer | None]
    # NOTE: their token_ids stay empty: `snapshot` takes them from `seqs`, the one copy.
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_prior: int = 0  # leading output tokens generated elsewhere (a resume): not returned
    handoff: bool = False  # prefill role: hand the KV over after the first token
    arrival_time: float = field(default_factory=time.monotonic)
    queue_time: float | None = None  # arrival to the first step that ran any of its tokens

    @classmethod
    def create(
        cls,
        request_id: str,
        prompt: str | list[int],
        token_ids: list[int],
        params: SamplingParams,
        prior: list[int],
        handoff: bool,
        eos_token_id: int | None,
        tokenizer,
    ) -> RequestState:
        """A new request's state: n sequences (choice i is `request_id#i` with
        `params.choice(i)`), each with a detokenizer when `tokenizer` is given."""
        seqs, detoks = [], []
        for i in range(params.n):
            child = params.choice(i)
            seqs.append(
                Sequence(
                    seq_id=request_id if params.n == 1 else f"{request_id}#{i}",
                    prompt_token_ids=list(token_ids),
                    params=child,
                    eos_token_id=eos_token_id,
                    output_token_ids=list(prior),
                )
            )
            detoks.append(
                None
                if tokenizer is None
                else IncrementalDetokenizer(tokenizer, token_ids + prior, child)
            )
        return cls(
            request_id,
            prompt if isinstance(prompt, str) else None,
            token_ids,
            seqs,
            detoks,
            [CompletionOutput(index=i) for i in range(params.n)],
            num_prior=len(prior),
            handoff=handoff,
        )

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    def record(self, i: int, seq: Sequence, sample) -> int | str | None:
        """Add the token `seq` just sampled to choice `i`'s delta. Returns the stop string it
        completed while `seq` runs on (the engine then finishes it), else None."""
        out, detok = self.outputs[i], self.detoks[i]
        token = seq.output_token_ids[-1]
        out.token_ids_delta.append(token)
        if sample.logprob is not None:
            if out.logprobs is None:
                out.logprobs = []
            out.logprobs.append((token, sample.logprob, sample.top_logprobs or []))
        if detok is None:
            return None
        delta = detok.add(token)
        stop_hit = detok.stop_hit if detok.stop_hit is not None and not seq.is_finished else None
        if seq.is_finished and detok.stop_hit is None:
            delta += detok.flush()
        out.text_delta += delta
        out.text = detok.text
        return stop_hit

    def finish(self, i: int, seq: Sequence) -> None:
        self.outputs[i].finish_reason = seq.finish_reason
        self.outputs[i].stop_reason = seq.stop_reason

    def snapshot(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[
                dataclasses.replace(
                    o,
                    token_ids=seq.output_token_ids[self.num_prior :],
                    logprobs=list(o.logprobs) if o.logprobs else o.logprobs,
                )
                for seq, o in zip(self.seqs, self.outputs, strict=True)
            ],
            finished=self.finished,
            num_cached_tokens=self.seqs[0].num_cached_tokens,
            queue_time=self.queue_time,
        )
