"""From a validated request to a response: model check, prompt tokens, max_tokens settled against
the context length, then one FanOut answered as JSON or as server-sent events ending in
`data: [DONE]`."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from baton.scheduler.limits import ContextLengthExceeded, settle_max_tokens
from baton.scheduler.sampling_params import SamplingParams
from baton.server.api import protocol as p
from baton.server.api import responses
from baton.server.api.cluster import Cluster, RequestFailed
from baton.server.api.errors import APIError, cluster_error, error_body, invalid_field
from baton.server.api.fan_out import Delta, FanOut
from baton.server.api.formats import ChatFormat, CompletionFormat, merge, sse
from baton.server.api.metrics import Metrics
from baton.server.api.structured import InvalidConstraint, constraint_of, with_constraint
from baton.server.api.tools import (
    ToolPlan,
    plan_tools,
    template_has_tools,
    tool_constraint,
    tool_conversation,
)

logger = logging.getLogger(__name__)

Format = CompletionFormat | ChatFormat


class EventStream(StreamingResponse):
    """Server-sent events whose `on_close` runs however the response ends, even when the
    client left before the body started (a never-started generator has no `finally` to run)."""

    def __init__(self, content, on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.headers["Cache-Control"] = "no-cache"
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Handlers:
    def __init__(self, cluster: Cluster, served_model_name: str, metrics: Metrics) -> None:
        self.cluster, self.served_model_name, self.metrics = cluster, served_model_name, metrics
        self.token_str = functools.lru_cache(maxsize=1 << 16)(self._decode_one)
        self._ignored: set[str] = set()  # unknown request fields, logged once each

    def _decode_one(self, token_id: int) -> str:
        return self.cluster.tokenizer.decode([token_id], skip_special_tokens=False)

    # ---- checks and prompts ---------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model not in (self.served_model_name, self.cluster.model_name):
            raise APIError(
                404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
            )

    def settle_params(
        self, params: SamplingParams, num_prompt: int, prompt_param: str
    ) -> SamplingParams:
        """`params` with max_tokens settled (None: the room the prompt leaves); a 400 naming
        `prompt_param` or max_tokens when they do not fit the context."""
        try:
            max_tokens = settle_max_tokens(
                num_prompt, params.max_tokens, self.cluster.max_model_len
            )
        except ContextLengthExceeded as e:
            head = f"This model's maximum context length is {e.max_model_len} tokens. However,"
            if e.max_tokens is None:
                raise APIError(
                    400,
                    f"{head} the prompt has {e.prompt_len} tokens, which leaves no room for the "
                    f"completion.",
                    param=prompt_param,
                    code="context_length_exceeded",
                ) from None
            raise APIError(
                400,
                f"{head} you requested {e.prompt_len + e.max_tokens} tokens ({e.prompt_len} in "
                f"the prompt, {e.max_tokens} for the completion). Please reduce the prompt or "
                f"max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            ) from None
        return dataclasses.replace(params, max_tokens=max_tokens)

    def completion_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "prompt: one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = list(self.cluster.tokenizer.encode(prompt))
        else:
            vocab = len(self.cluster.tokenizer)
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(
                    400, f"prompt: token id {bad} is not in [0, {vocab})", param="prompt"
                )
            ids = list(prompt)
        if not ids:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        return ids

    def chat_prompt(
        self, messages: list[p.ChatMessage], tools: ToolPlan | None = None
    ) -> list[int]:
        conv = [m.template_dict() for m in messages]
        tool_dicts = None
        if template_has_tools(getattr(self.cluster.tokenizer, "chat_template", None)):
            if tools is not None:
                tool_dicts = [t.model_dump(exclude_none=True) for t in tools.tools]
        elif tools is not None or any(m.tool_calls or m.role == "tool" for m in messages):
            conv = tool_conversation(conv, tools)
        try:
            out = self.cluster.tokenizer.apply_chat_template(
                conv, add_generation_prompt=True, tokenize=True, tools=tool_dicts
            )
        except Exception as e:  # a template that rejects the conversation (roles, order)
            raise APIError(
                400, f"messages: the chat template failed: {e}", param="messages"
            ) from None
        # NOTE: transformers 5 returns a BatchEncoding (a mapping) where 4 returned the ids.
        if hasattr(out, "keys"):
            out = out["input_ids"]
        if out and isinstance(out[0], list):
            out = out[0]
        return [int(t) for t in out]

    def checked_params(
        self, req: p.CompletionRequest | p.ChatCompletionRequest, tools: ToolPlan | None = None
    ):
        """The model must be ours and the sampling fields valid (400 naming the field). The
        constraint of a structured-output field, or of a forced tool choice, rides in `guided`."""
        self.check_model(req.model)
        self._log_ignored(req)
        try:
            params = req.sampling_params()
        except ValueError as e:
            raise invalid_field(e) from None
        try:
            constraint = constraint_of(req)
            forced = tool_constraint(tools) if tools is not None else None
            if forced is not None and constraint is not None:
                why = f"cannot be combined with {constraint.field}"
                raise InvalidConstraint("tool_choice", why)
            params = with_constraint(params, forced or constraint)
        except InvalidConstraint as e:
            raise APIError(400, str(e), param=e.field) from None
        if params.stop_token_ids:
            vocab = len(self.cluster.tokenizer)
            bad = next((t for t in params.stop_token_ids if t >= vocab), None)
            if bad is not None:
                raise APIError(
                    400,
                    f"stop_token_ids: token id {bad} is not in [0, {vocab})",
                    param="stop_token_ids",
                )
        return params

    def _log_ignored(self, req) -> None:
        for name in req.model_extra or {}:
            if name not in self._ignored:
                self._ignored.add(name)
                logger.warning("ignoring the request field %r, which Baton does not know", name)

    # ---- the two endpoints ----------------------------------------------------------------

    async def completions(self, req: p.CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        params = self.checked_params(req)
        prompt_ids = self.completion_prompt(req.prompt)
        params = self.settle_params(params, len(prompt_ids), "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        fmt = CompletionFormat(rid, req.model, params.n, self.token_str)
        return await self._run(request, arrival, rid, prompt_ids, params, req, fmt)

    async def chat(self, req: p.ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        try:
            tools = plan_tools(req)
        except InvalidConstraint as e:
            raise APIError(400, str(e), param=e.field) from None
        params = self.checked_params(req, tools)
        prompt_ids = self.chat_prompt(req.messages, tools)
        params = self.settle_params(params, len(prompt_ids), "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        fmt = ChatFormat(rid, req.model, params.n, self.token_str, params.logprobs or 0, tools)
        return await self._run(request, arrival, rid, prompt_ids, params, req, fmt)

    # ---- running ----------------------------------------------------------------------------

    async def _run(
        self,
        request: Request,
        arrival: float,
        rid: str,
        prompt_ids: list[int],
        params: SamplingParams,
        req: p.CompletionRequest | p.ChatCompletionRequest,
        fmt: Format,
    ) -> Response:
        gen = FanOut(self.cluster, rid, prompt_ids, params, self.metrics, arrival)
        try:
            await gen.start()  # NoWorkerAvailable, Overloaded: answered by their handlers
        except ValueError as e:  # the cluster's own checks (KV it could never hold)
            raise APIError(400, str(e), param="max_tokens") from None
        if params.guided:  # a worker's grammar library may refuse it: a 400, before any body
            first = await gen.wait_first()
            if isinstance(first, RequestFailed) and first.status == 400:
                await gen.close()
                field = params.extra.get("guided_field")
                message = str(first)
                if field and message.startswith("guided_spec: "):  # name what the client sent
                    message = f"{field}: {message.removeprefix('guided_spec: ')}"
                raise APIError(400, message, param=field)
        if req.stream:
            return EventStream(self._events(gen, fmt, req.include_usage), on_close=gen.close)
        return await self._respond(gen, fmt, request)

    def _usage(self, gen: FanOut) -> responses.Usage:
        n_prompt, n_out = len(gen.prompt_token_ids), gen.num_generated_tokens
        return responses.Usage(
            prompt_tokens=n_prompt,
            completion_tokens=n_out,
            total_tokens=n_prompt + n_out,
            prompt_tokens_details=responses.PromptTokensDetails(
                cached_tokens=gen.num_cached_tokens
            ),
        )

    async def _events(self, gen: FanOut, fmt: Format, include_usage: bool):
        try:
            for chunk in fmt.head():
                yield sse(chunk)
            async for d in gen.deltas():
                yield sse(fmt.chunk(d))
            if include_usage:
                yield sse(fmt.usage_chunk(self._usage(gen)))
        except Exception as e:
            err = cluster_error(e)  # a worker lost with nowhere to resume, a deadline passed
            if err is None:
                logger.exception("request %s failed while streaming", fmt.id)
                err = APIError(500, "internal error")
            else:
                logger.warning("request %s failed while streaming: %s", fmt.id, e)
            self.metrics.observe_error(err.status)
            yield f"data: {json.dumps(error_body(err.status, err.message, code=err.code))}\n\n"
        finally:
            # NOTE: a disconnect cancels us inside a cancelled anyio scope: shield the aborts.
            with anyio.CancelScope(shield=True):
                await gen.close()
        yield "data: [DONE]\n\n"

    async def _respond(self, gen: FanOut, fmt: Format, request: Request) -> Response:
        want_logprobs = gen.params.logprobs is not None
        merged = [Delta(i, "", [], [] if want_logprobs else None) for i in range(fmt.n)]

        async def collect() -> None:
            async for d in gen.deltas():
                merge(merged, d)

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                logger.info("client left before %s finished; aborted", fmt.id)
                return Response(status_code=499)
            work.result()
        finally:
            for t in (work, gone):
                t.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)
            await gen.close()
        return JSONResponse(fmt.response(merged, self._usage(gen)).model_dump(mode="json"))
