"""One OpenAI-shaped error body, {"error": {message, type, param, code}}, for every failure.

Tracebacks go to the log, never into a response.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from baton.server.api.cluster import NoWorkerAvailable, Overloaded, RequestFailed

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
MAX_MESSAGE_CHARS = 500  # a message may quote the input: never echo a giant value back
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """Raised anywhere below a route; answered as an OpenAI error with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None):
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    body = error_body(err.status, err.message, err.param, err.code)
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def invalid_field(e: ValueError) -> APIError:
    """A 400 from a ValueError whose message starts with the field it is about ("field: why")."""
    msg = str(e)
    if len(msg) > MAX_MESSAGE_CHARS:
        msg = msg[:MAX_MESSAGE_CHARS] + " ..."
    head = msg.split(":", 1)[0]
    return APIError(400, msg, param=head if re.fullmatch(r"[a-z_]+", head) else None)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"malformed JSON body: {why}".rstrip(": "))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not loc:
        if isinstance(first.get("input"), bytes):  # not parsed: no JSON content type
            return APIError(400, "the request body must be a JSON object sent as application/json")
        return APIError(400, "the request body must be a JSON object")
    # NOTE: a union field fails once per member; name the field once with each reason.
    same = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1] == loc[:1]]
    if len(same) > 1:
        why = "; ".join(dict.fromkeys(e.get("msg", "invalid value") for e in same))
        return APIError(400, f"{loc[0]}: {why}", param=loc[0])
    return APIError(400, f"{'.'.join(loc)}: {first.get('msg', 'invalid value')}", param=loc[0])


def _http_error(exc: HTTPException) -> APIError:
    # NOTE: FastAPI answers any failure to parse the body with a bare 400 raised from it.
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers)
    if isinstance(cause, RecursionError):
        return APIError(400, "malformed JSON body: nested too deeply")
    if isinstance(cause, UnicodeDecodeError):
        return APIError(400, f"the request body is not valid UTF-8 (byte {cause.start})")
    return APIError(400, f"malformed JSON body: {str(cause)[:MAX_MESSAGE_CHARS]}")


def cluster_error(exc: Exception) -> APIError | None:
    """The OpenAI error for what the cluster raises (placing or running a request), or None
    for anything else."""
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(exc, NoWorkerAvailable):
        msg = f"no {exc.role} worker is available; retry later"
        return APIError(503, msg, code="no_worker_available", headers=retry)
    if isinstance(exc, Overloaded):
        return APIError(429, f"server busy: {exc}; retry later", code="overloaded", headers=retry)
    if isinstance(exc, RequestFailed):
        codes = {400: None, 503: "no_worker_available", 504: "request_timeout"}
        code = codes.get(exc.status, "failed")
        return APIError(
            exc.status, str(exc), code=code, headers=retry if exc.status == 503 else None
        )
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(_http_error(exc))

    async def _cluster(request: Request, exc: Exception) -> JSONResponse:
        return error_response(cluster_error(exc))

    for exc_type in (NoWorkerAvailable, Overloaded, RequestFailed):
        app.add_exception_handler(exc_type, _cluster)

    app.add_middleware(CatchAll)


class CatchAll:
    """Anything unexpected: logged with its traceback, answered 500 "internal error"."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            logger.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:  # too late for a status; the client sees the body end early
                return
            body = json.dumps(error_body(500, "internal error")).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
