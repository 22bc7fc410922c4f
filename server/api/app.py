"""The router's OpenAI-compatible HTTP app: routes only; the work is in `handlers`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

import baton
from baton.server.api import protocol as p
from baton.server.api import responses
from baton.server.api.auth import AccessConfig, BearerAuth
from baton.server.api.body_limit import DEFAULT_MAX_BODY_BYTES, BodyLimit
from baton.server.api.cluster import Cluster
from baton.server.api.errors import install_error_handlers
from baton.server.api.handlers import Handlers
from baton.server.api.metrics import Metrics

# NOTE: declared so the OpenAPI schema tells the truth: errors are OpenAI-shaped 4xx (never
# FastAPI's 422), and generation answers JSON or, with stream=true, server-sent events.
_ERRORS: dict = {
    "4XX": {
        "model": responses.ErrorResponse,
        "description": "The request is invalid (param says where)",
    },
    "5XX": {
        "model": responses.ErrorResponse,
        "description": "Internal error, or no worker is ready (503)",
    },
}


_JSON: dict = {"application/json": {}}


# One server-sent event, as parsed from the stream (OpenAPI 3.0/3.1 put the per-event schema in
# `schema`): `data` is a JSON chunk, an error object, or "[DONE]".
_SSE_EVENT: dict = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "contentMediaType": "application/json"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}


def _generation(body: type) -> dict:
    sse = {"text/event-stream": {"schema": _SSE_EVENT}}
    return {200: {"model": body, "content": sse}, **_ERRORS}


class CountErrors:
    """Counts every answer of status 400 and up (the outermost layer: it sees them all)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.observe_error(message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def build_app(
    cluster: Cluster,
    *,
    served_model_name: str,
    access: AccessConfig | None = None,
    metrics: Metrics | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """Routes over `cluster`. It needs: model_name, max_model_len, tokenizer, generate, abort,
    health, workers (see baton.server.api.cluster). A request body over `max_body_bytes` is
    answered 413 before it is parsed; `access` says which routes ask for which key."""
    metrics = metrics if metrics is not None else Metrics()
    metrics.watch_workers(cluster.workers)
    handlers = Handlers(cluster, served_model_name, metrics)
    app = FastAPI(title="Baton", version=baton.__version__)
    app.state.metrics, app.state.handlers = metrics, handlers
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    access = access or AccessConfig()
    if access.api_key or access.admin_key:
        app.add_middleware(BearerAuth, access=access)
    app.add_middleware(CountErrors, metrics=metrics)

    @app.post("/v1/completions", responses=_generation(responses.CompletionResponse))
    async def completions(req: p.CompletionRequest, request: Request) -> Response:
        return await handlers.completions(req, request)

    @app.post("/v1/chat/completions", responses=_generation(responses.ChatCompletionResponse))
    async def chat_completions(req: p.ChatCompletionRequest, request: Request) -> Response:
        return await handlers.chat(req, request)

    @app.get("/v1/models", responses=_ERRORS)
    async def models() -> responses.ModelList:
        card = responses.ModelCard(
            id=served_model_name, root=cluster.model_name, max_model_len=cluster.max_model_len
        )
        return responses.ModelList(data=[card])

    @app.get("/health", responses={503: {"description": "Not ready", "content": _JSON}})
    async def health() -> JSONResponse:
        ok, reason = cluster.health()
        status = "ok" if ok else "unavailable"
        return JSONResponse({"status": status, "reason": reason}, status_code=200 if ok else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": baton.__version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/workers")
    async def workers() -> JSONResponse:
        return JSONResponse(cluster.workers())

    return app
