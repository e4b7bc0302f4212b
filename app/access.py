"""The access log and the request counter: one line and one count per request, at its end.

A plain response ends when its middleware runs. A stream (SSE) ends later: when its handler
returns, or when the connection closes (the client left and Sanic cancelled the handler), or
when the next request arrives on the same keep-alive connection, whichever comes first.
"""

from __future__ import annotations

import logging
import re
from time import perf_counter
from typing import Any

from sanic import HTTPResponse, Request, Sanic

from app.config import Settings

log = logging.getLogger("haia.access")

_PARAM = re.compile(r"<(\w+)(?::[^>]*)?>")
UNMATCHED = "unmatched"


def route_label(request: Request) -> str:
    """The route pattern that answered (`/v1/chat/completions/{completion_id}`), never the raw
    path, so the label has a bounded set of values."""
    route = request.route
    if route is None:
        return UNMATCHED
    return "/" + _PARAM.sub(r"{\1}", route.path).lstrip("/")


def _is_stream(response: HTTPResponse) -> bool:
    return (response.content_type or "").startswith("text/event-stream")


class AccessLog:
    """Times every request; logs and counts each once, when it ends."""

    def __init__(self, app: Sanic[Any, Any], settings: Settings) -> None:
        self._app = app
        self._enabled = settings.access_log

    def done(self, request: Request, status: int) -> None:
        if getattr(request.ctx, "access_done", True):
            return
        request.ctx.access_done = True
        elapsed_ms = (perf_counter() - request.ctx.access_started) * 1000
        if self._enabled:
            fields = {
                "method": request.method,
                "path": request.path,
                "status": status,
                "duration_ms": round(elapsed_ms, 1),
            }
            log.info(
                "%s %s %d %.1fms",
                request.method,
                request.path,
                status,
                elapsed_ms,
                extra={
                    "request_id": getattr(request.ctx, "request_id", "-"),
                    "haia_fields": fields,
                },
            )
        services = getattr(self._app.ctx, "services", None)
        if services is not None:
            services.requests.add(route=route_label(request), status=status)

    def end_open_stream(self, conn_info: Any) -> None:
        request = getattr(conn_info.ctx, "haia_stream", None) if conn_info else None
        if request is not None:
            conn_info.ctx.haia_stream = None
            self.done(request, request.ctx.access_status)

    async def start(self, request: Request) -> None:
        self.end_open_stream(request.conn_info)
        request.ctx.access_started = perf_counter()
        request.ctx.access_done = False

    async def respond(self, request: Request, response: HTTPResponse) -> None:
        if not hasattr(request.ctx, "access_started"):  # refused before any middleware ran
            await self.start(request)
        if _is_stream(response) and request.conn_info is not None:
            request.ctx.access_status = response.status
            request.conn_info.ctx.haia_stream = request
        else:
            self.done(request, response.status)

    async def handler_returned(self, request: Request) -> None:
        conn_info = request.conn_info
        if conn_info is not None and getattr(conn_info.ctx, "haia_stream", None) is request:
            self.end_open_stream(conn_info)

    async def connection_closed(self, conn_info: Any) -> None:
        self.end_open_stream(conn_info)


def setup_access(app: Sanic[Any, Any], settings: Settings) -> None:
    access = AccessLog(app, settings)
    app.on_request(access.start, priority=1000)
    app.on_response(access.respond, priority=1000)  # type: ignore[no-untyped-call]
    app.signal("http.handler.after")(access.handler_returned)
    app.signal("http.lifecycle.complete")(access.connection_closed)
