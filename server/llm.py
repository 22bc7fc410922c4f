"""The offline API: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import fields

from tqdm.auto import tqdm

from baton.scheduler.sampling_params import SamplingParams
from baton.server.config import EngineConfig
from baton.server.engine import LLMEngine
from baton.server.outputs import RequestOutput

Prompt = str | list[int]
Message = dict[str, str]


def _is_token_ids(p: object) -> bool:
    return isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


class LLM:
    """Offline batched generation. Keyword arguments are the fields of EngineConfig."""

    def __init__(self, model: str = "smollm2", **kwargs) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"LLM: unknown argument(s) {unknown}; accepted: {sorted(known)}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings or token id lists); outputs come back in order."""
        if isinstance(prompts, str) or _is_token_ids(prompts) and prompts:
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            return []
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                if not isinstance(prompt, str) and not _is_token_ids(prompt):
                    raise ValueError(
                        f"prompt: must be a string or a list of token ids, got "
                        f"{type(prompt).__name__}"
                    )
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
        except Exception:
            for rid in ids:  # NOTE: a bad prompt must leave nothing allocated behind it
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them."""
        if self.tokenizer is None:
            raise ValueError("chat: this model has no tokenizer")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in convs]
        return self.generate(prompts, params, use_tqdm)

    def apply_chat_template(
        self, conv: list[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        if not conv or not all(isinstance(m, dict) and "role" in m for m in conv):
            raise ValueError("messages: must be a non-empty list of {'role', 'content'} dicts")
        text = self.tokenizer.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        try:
            while len(final) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [final[rid] for rid in ids]
