"""Deltas of a FanOut as OpenAI bodies: completions or chat, streamed chunks or one response.

A formatter lives for one request: completions keep each choice's running text offset.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from pydantic import BaseModel

from baton.server.api import responses
from baton.server.api.fan_out import Delta
from baton.server.api.tools import ToolCallStream, ToolPlan

MIN_LOGPROB = -9999.0  # NOTE: -inf is not JSON; OpenAI clients expect a finite float

TokenStr = Callable[[int], str]


def _lp(x: float) -> float:
    return x if x == x and x > MIN_LOGPROB else MIN_LOGPROB


def sse(chunk: BaseModel) -> str:
    """One server-sent event. A chunk's usage is left out unless set; deltas keep set keys only."""
    d = chunk.model_dump(mode="json")
    if d.get("usage") is None:
        d.pop("usage", None)
    for c in d.get("choices", ()):
        if "delta" in c:
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
    return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"


def merge(deltas: list[Delta], d: Delta) -> None:
    """Adds `d` to the accumulated delta of its choice (a non-streamed response)."""
    m = deltas[d.index]
    m.text += d.text
    m.token_ids += d.token_ids
    if m.logprobs is not None and d.logprobs is not None:
        m.logprobs += d.logprobs
    if d.finish_reason is not None:
        m.finish_reason, m.stop_reason = d.finish_reason, d.stop_reason


class CompletionFormat:
    def __init__(self, request_id: str, model: str, n: int, token_str: TokenStr) -> None:
        self.id, self.model, self.n, self.token_str = request_id, model, n, token_str
        self._offsets = [0] * n

    def head(self) -> list[BaseModel]:
        return []

    def _logprobs(self, index: int, entries: list | None) -> responses.CompletionLogprobs | None:
        if entries is None:
            return None
        out = responses.CompletionLogprobs()
        for tid, lp, top in entries:
            tok = self.token_str(tid)
            out.tokens.append(tok)
            out.token_logprobs.append(_lp(lp))
            tops = {self.token_str(t): _lp(x) for t, x in top} if top else {tok: _lp(lp)}
            out.top_logprobs.append(tops)
            out.text_offset.append(self._offsets[index])
            self._offsets[index] += len(tok)
        return out

    def _choice(self, d: Delta) -> responses.CompletionChoice:
        return responses.CompletionChoice(
            index=d.index,
            text=d.text,
            logprobs=self._logprobs(d.index, d.logprobs),
            finish_reason=d.finish_reason,
            stop_reason=d.stop_reason,
        )

    def chunk(self, d: Delta) -> BaseModel:
        return responses.CompletionResponse(id=self.id, model=self.model, choices=[self._choice(d)])

    def usage_chunk(self, usage: responses.Usage) -> BaseModel:
        return responses.CompletionResponse(id=self.id, model=self.model, choices=[], usage=usage)

    def response(self, deltas: list[Delta], usage: responses.Usage) -> BaseModel:
        choices = [self._choice(d) for d in deltas]
        return responses.CompletionResponse(
            id=self.id, model=self.model, choices=choices, usage=usage
        )


class ChatFormat:
    def __init__(
        self,
        request_id: str,
        model: str,
        n: int,
        token_str: TokenStr,
        top_logprobs: int,
        tools: ToolPlan | None = None,
    ) -> None:
        self.id, self.model, self.n, self.token_str = request_id, model, n, token_str
        self.top_logprobs = top_logprobs
        self.tools = tools
        self._streams = [ToolCallStream(tools) for _ in range(n)] if tools else None

    def _entry(self, tid: int, lp: float) -> responses.TopLogprob:
        tok = self.token_str(tid)
        return responses.TopLogprob(token=tok, logprob=_lp(lp), bytes=list(tok.encode("utf-8")))

    def _logprobs(self, entries: list | None) -> responses.ChatLogprobs | None:
        if entries is None:
            return None
        content = []
        for tid, lp, top in entries:
            e = self._entry(tid, lp)
            tops = [self._entry(t, x) for t, x in (top or [])[: self.top_logprobs]]
            content.append(responses.TokenLogprob(**e.model_dump(), top_logprobs=tops))
        return responses.ChatLogprobs(content=content)

    def _chunk(
        self, choice: responses.ChatChunkChoice | None, usage: responses.Usage | None = None
    ) -> BaseModel:
        choices = [choice] if choice is not None else []
        return responses.ChatCompletionChunk(
            id=self.id, model=self.model, choices=choices, usage=usage
        )

    def head(self) -> list[BaseModel]:
        """The role of each choice comes first, as OpenAI sends it."""
        delta = responses.DeltaMessage(role="assistant", content="")
        return [self._chunk(responses.ChatChunkChoice(index=i, delta=delta)) for i in range(self.n)]

    def chunk(self, d: Delta) -> BaseModel:
        text, calls, finish = d.text, [], d.finish_reason
        if self._streams is not None:
            stream = self._streams[d.index]
            text = stream.feed(text)
            if finish is not None:
                held, calls, finish = stream.finish(finish)
                text += held
        tool_calls = [
            responses.DeltaToolCall(
                index=k,
                id=c.id,
                type="function",
                function=responses.DeltaFunction(
                    name=c.function.name, arguments=c.function.arguments
                ),
            )
            for k, c in enumerate(calls)
        ]
        choice = responses.ChatChunkChoice(
            index=d.index,
            delta=responses.DeltaMessage(content=text or None, tool_calls=tool_calls or None),
            logprobs=self._logprobs(d.logprobs),
            finish_reason=finish,
            stop_reason=d.stop_reason,
        )
        return self._chunk(choice)

    def _message(self, d: Delta) -> tuple[responses.AssistantMessage, str | None]:
        if self.tools is None:
            return responses.AssistantMessage(content=d.text), d.finish_reason
        stream = ToolCallStream(self.tools)
        text = stream.feed(d.text)
        held, calls, finish = stream.finish(d.finish_reason)
        content = text + held
        return responses.AssistantMessage(
            content=content or None if calls else content, tool_calls=calls
        ), finish

    def usage_chunk(self, usage: responses.Usage) -> BaseModel:
        return self._chunk(None, usage)

    def response(self, deltas: list[Delta], usage: responses.Usage) -> BaseModel:
        choices = []
        for d in deltas:
            message, finish = self._message(d)
            choices.append(
                responses.ChatChoice(
                    index=d.index,
                    message=message,
                    logprobs=self._logprobs(d.logprobs),
                    finish_reason=finish,
                    stop_reason=d.stop_reason,
                )
            )
        return responses.ChatCompletionResponse(
            id=self.id, model=self.model, choices=choices, usage=usage
        )
