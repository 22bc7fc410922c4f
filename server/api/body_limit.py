"""A cap on the request body, counted as the bytes arrive: 413 whatever Content-Length says."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from baton.server.api.errors import APIError, error_response

DEFAULT_MAX_BODY_BYTES = 8 * 2**20


class BodyTooLarge(Exception):
    """Raised from `receive` once the body passes the limit; BodyLimit answers it."""


class BodyLimit:
    """Answers 413 to a body over `max_bytes`: at once when Content-Length declares one, else as
    soon as the bytes received (chunked, or more than declared) pass it. The app never sees more
    than `max_bytes` of body.

    NOTE: the app may answer the failed read itself (FastAPI answers 400 to any error reading the
    body); an answer that starts after the limit was passed is dropped for the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        assert max_bytes > 0, max_bytes
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body exceeds the limit of {self.max_bytes} bytes",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and (len(declared) > 18 or int(declared) > self.max_bytes):
            await error_response(self.too_large())(scope, receive, send)
            return
        received, over, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            if started:
                raise
        if over and not started:
            await error_response(self.too_large())(scope, receive, send)
