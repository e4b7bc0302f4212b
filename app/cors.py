"""CORS for browser apps on other origins (HAIA_CORS_ORIGINS), preflights included.

Sanic-ext's CORS takes a fixed list of allowed headers; the openai JS SDK sends a family of
`x-stainless-*` headers, so the rules are a small middleware of HAIA's own.
"""

from __future__ import annotations

from typing import Any

from sanic import HTTPResponse, Request, Sanic
from sanic.response import empty

from app.config import Settings

ALLOWED_HEADERS = (
    "Authorization",
    "Content-Type",
    "Accept",
    "Last-Event-ID",
    "X-Conversation-ID",
    "X-Request-ID",
    "X-OpenWebUI-Chat-Id",
    "X-OpenWebUI-User-Id",
)
ALLOWED_HEADER_PREFIX = "x-stainless-"
"""The openai JS SDK's own headers (`x-stainless-os`, `x-stainless-retry-count`, …)."""
EXPOSED_HEADERS = "X-Conversation-ID, X-Request-ID, Retry-After"
ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
MAX_AGE = "600"

_ALLOWED_LOWER = frozenset(name.lower() for name in ALLOWED_HEADERS)


def header_allowed(name: str) -> bool:
    name = name.strip().lower()
    return name in _ALLOWED_LOWER or name.startswith(ALLOWED_HEADER_PREFIX)


def allow_headers(requested: str) -> str:
    """What a preflight answers for `Access-Control-Request-Headers`: the requested names when
    every one is allowed, else the fixed list (and the browser refuses the request)."""
    names = [name.strip() for name in requested.split(",") if name.strip()]
    if names and all(header_allowed(name) for name in names):
        return ", ".join(names)
    return ", ".join(ALLOWED_HEADERS)


class CorsPolicy:
    """Which origins may call HAIA from a browser."""

    def __init__(self, origins: list[str]) -> None:
        self.any = "*" in origins
        self._origins = frozenset(origins)

    def allow_origin(self, origin: str | None) -> str | None:
        """The `Access-Control-Allow-Origin` value for `origin`, or None when not allowed."""
        if not origin:
            return None
        if self.any:
            return "*"
        return origin if origin.rstrip("/").lower() in self._origins else None


def _add_vary(headers: Any, *names: str) -> None:
    present = [part.strip() for part in headers.get("Vary", "").split(",") if part.strip()]
    headers["Vary"] = ", ".join(dict.fromkeys([*present, *names]))


def setup_cors(app: Sanic[Any, Any], settings: Settings) -> None:
    """Answer preflights (before authentication: browsers send no key on them) and mark the
    responses of allowed origins. Nothing at all when HAIA_CORS_ORIGINS is empty."""
    if not settings.cors_origins:
        return
    policy = CorsPolicy(settings.cors_origins)

    async def preflight(request: Request) -> HTTPResponse | None:
        if request.method != "OPTIONS" or "access-control-request-method" not in request.headers:
            return None
        response = empty(status=204)
        allowed = policy.allow_origin(request.headers.get("origin"))
        if allowed is not None:
            response.headers.update(
                {
                    "Access-Control-Allow-Origin": allowed,
                    "Access-Control-Allow-Methods": ALLOWED_METHODS,
                    "Access-Control-Allow-Headers": allow_headers(
                        request.headers.get("access-control-request-headers", "")
                    ),
                    "Access-Control-Max-Age": MAX_AGE,
                }
            )
        if not policy.any:
            _add_vary(response.headers, "Origin")
        _add_vary(response.headers, "Access-Control-Request-Headers")
        return response

    async def mark(request: Request, response: HTTPResponse) -> None:
        if "Access-Control-Allow-Origin" in response.headers:
            return  # a preflight answered above
        allowed = policy.allow_origin(request.headers.get("origin"))
        if allowed is not None:
            response.headers["Access-Control-Allow-Origin"] = allowed
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if not policy.any:
            _add_vary(response.headers, "Origin")

    app.on_request(preflight, priority=500)
    app.on_response(mark, priority=500)  # type: ignore[no-untyped-call]
