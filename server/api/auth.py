"""Who may call which route: the API key guards `/v1/*`; what describes the deployment
(`/workers`, `/docs`, `/openapi.json`, anything else) asks for the admin key, or the API key
where no admin key is set; `/metrics` too unless `metrics_public`; `/health` and `/version`
are open, for probes. With no key set, everything is open.

Keys come from a flag, a file (`--api-key-file`: the first line; `ps` shows flags, not files),
or the environment (`BATON_API_KEY`, `BATON_ADMIN_KEY`), first found in that order.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from baton.server.api.errors import APIError, error_response

OPEN_PATHS = frozenset({"/health", "/version"})


@dataclass(frozen=True)
class AccessConfig:
    api_key: str | None = None
    admin_key: str | None = None
    metrics_public: bool = False

    def __repr__(self) -> str:  # keys stay out of logs and tracebacks
        return (
            f"AccessConfig(api_key={'set' if self.api_key else None}, "
            f"admin_key={'set' if self.admin_key else None}, "
            f"metrics_public={self.metrics_public})"
        )

    def key_for(self, path: str) -> str | None:
        """The key `path` asks for, or None where it is open."""
        if path == "/v1" or path.startswith("/v1/"):
            return self.api_key or None
        if path in OPEN_PATHS or (path == "/metrics" and self.metrics_public):
            return None
        return self.admin_key or self.api_key or None


def read_key(flag_value: str | None, file: str | None, env: str, what: str) -> str | None:
    """One key from its flag, its file or the environment variable `env` (first found)."""
    if flag_value is not None and file is not None:
        raise ValueError(f"{what}: give the key or its file, not both")
    if file is not None:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"{what}-file: cannot read {file}: {e.strerror}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"{what}-file: {file} holds no key")
        return key
    if flag_value is not None:
        if not flag_value.strip():
            raise ValueError(f"{what}: empty key")
        return flag_value
    return os.environ.get(env) or None


class BearerAuth:
    """Asks each request for `Authorization: Bearer <key>` as `access` says, before the body
    is read (a bad key is a 401 whatever the body holds), comparing in constant time."""

    def __init__(self, app: ASGIApp, access: AccessConfig) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            key = self.access.key_for(scope["path"])
            if key is not None:
                got = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(got, f"Bearer {key}".encode()):
                    err = APIError(401, "invalid or missing API key", code="invalid_api_key")
                    await error_response(err)(scope, receive, send)
                    return
        await self.app(scope, receive, send)
