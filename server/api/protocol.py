"""OpenAI request and response bodies (plus vLLM's sampling extras), and their SamplingParams."""

from __future__ import annotations

import contextlib
import json
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from baton.scheduler.sampling_params import SamplingParams


def _fits_64_bits(v: int) -> int:
    if not -(2**63) <= v < 2**63:
        raise ValueError("must fit in 64 bits")
    return v


# NOTE: integers and stop strings travel to the workers in msgpack frames: a number past 64 bits
# or stop strings near the 1 MiB frame header would fail there, after the request was placed.
# A validator, not ge/le: FastAPI writes schema bounds as floats, and 2**63 - 1 is not one.
Int64 = Annotated[int, AfterValidator(_fits_64_bits)]
MAX_STOP_CHARS = 1000
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Request(BaseModel):
    # NOTE: unknown fields are ignored, as OpenAI does; strict so "5" is not a number.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = False


class JsonSchemaFormat(_Request):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: str  # text, json_object or json_schema (others: a 400, see api.structured)
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` object (its `guided_*` fields are the older spelling)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    json_: dict | bool | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = False


class _SamplingRequest(_Request):
    """The fields completions and chat completions share. Fields not named here are ignored,
    as OpenAI does, and logged (see Handlers.checked_params)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    n: Int64 | None = 1
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    min_tokens: Int64 | None = 0
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    cache_salt: Annotated[str, Field(max_length=256)] | None = None  # prefix-cache tenant
    # structured output (see baton.server.api.structured)
    response_format: ResponseFormat | None = None
    guided_json: dict | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises ValueError naming the offending field."""
        if self.logit_bias:  # refused, not ignored: a bias that bans tokens must not be lost
            raise ValueError("logit_bias: is not supported")
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            n=1 if self.n is None else self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens or 0,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=(
                1.0 if self.repetition_penalty is None else self.repetition_penalty
            ),
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens is not False,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            cache_salt=self.cache_salt or "",
        )


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Int64 | None = 16
    logprobs: Int64 | None = None
    echo: bool | None = False

    def sampling_params(self) -> SamplingParams:
        if self.echo:
            raise ValueError("echo: is not supported")
        return self._params(self.max_tokens, self.logprobs)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer to one of them

    @property
    def text(self) -> str:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(p.text for p in content)
        return content or ""

    def template_dict(self) -> dict:
        """What the chat template sees: parts joined into one string; tool call arguments as
        objects (what templates with a tool format expect)."""
        d = {"role": self.role, "content": self.text}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_calls:
            d["tool_calls"] = [
                {"id": c.id, "type": "function", "function": c.function.model_dump()}
                for c in self.tool_calls
            ]
            for c in d["tool_calls"]:
                with contextlib.suppress(ValueError):
                    c["function"]["arguments"] = json.loads(c["function"]["arguments"])
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


class FunctionDef(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int64 | None = None
    max_completion_tokens: Int64 | None = None
    logprobs: bool | None = False
    top_logprobs: Int64 | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs to be true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        try:
            return self._params(max_tokens, logprobs)
        except ValueError as e:
            if str(e).startswith("logprobs:"):  # chat names the count top_logprobs
                raise ValueError("top_" + str(e)) from None
            raise
