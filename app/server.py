"""The Sanic application: one `setup_*` per concern."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import uuid
from types import SimpleNamespace

from arq.connections import RedisSettings, create_pool
from redis.exceptions import RedisError
from sanic import HTTPResponse, Request, Sanic
from sanic.config import Config
from sanic.exceptions import SanicException
from sanic.response import json as json_response
from sanic_ext import Extend
from tortoise.exceptions import (
    DBConnectionError,
    OperationalError,
)

from app import jobs, keys
from app.access import setup_access
from app.catalog import PROBE_TIMEOUT, Catalog
from app.config import Settings
from app.context import Services
from app.cors import setup_cors
from app.db import close_database, open_database
from app.db.failures import asyncpg_errors, chain, refused_by_database
from app.errors import HaiaError, InvalidRequest, Unauthorized, Unavailable, error_body
from app.generations import MAX_TRIES, SWEEP_EVERY, Sweeper, reap_orphans
from app.http1 import SSEClient
from app.hub import EventHub
from app.logs import request_id_var
from app.metrics import RequestCounts
from app.openapi import secure_operations
from app.redis_pool import quick_checkout
from app.relay import Relay
from app.routes import chat, completions, conversations, health, models, responses
from app.routes import metrics as metrics_route
from app.stream_slots import StreamSlots
from app.turns import MAX_CHAT_ID

log = logging.getLogger(__name__)

App = Sanic[Config, SimpleNamespace]

REQUEST_ID_HEADER = "X-Request-ID"
OPENWEBUI_USER_HEADER = "X-OpenWebUI-User-Id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_SANIC_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
PUBLIC_PATHS = frozenset({"/", "/health"})
DOCS_PREFIX = "/docs"
_STORE_DOWN: tuple[type[BaseException], ...] = (
    DBConnectionError,
    OperationalError,
    RedisError,
    ConnectionError,
    OSError,
)


def _store_down(exc: BaseException) -> bool:
    """The database or Redis is unreachable (as opposed to refusing a value)."""
    return isinstance(exc, _STORE_DOWN + asyncpg_errors()[0])


def setup_resources(app: App, settings: Settings, redis_url: str) -> None:
    async def open_resources(app: App) -> None:
        await open_database(settings.database_url)
        redis = await create_pool(
            RedisSettings.from_dsn(redis_url),
            default_queue_name=keys.QUEUE,
            job_serializer=jobs.serialize,
            job_deserializer=jobs.deserialize,
        )
        quick_checkout(redis)
        hub = EventHub(redis)
        await hub.start()
        http = SSEClient(connect_timeout=PROBE_TIMEOUT, read_timeout=PROBE_TIMEOUT)
        streams = StreamSlots(
            redis, limit=settings.max_streams_per_owner, lease=4 * settings.keepalive_interval
        )
        streams.start()
        requests = RequestCounts(redis)
        requests.start()
        app.ctx.services = Services(
            settings=settings,
            redis=redis,
            hub=hub,
            relay=Relay(redis, hub, keepalive=settings.keepalive_interval),
            http=http,
            catalog=Catalog(settings, http),
            streams=streams,
            requests=requests,
        )

    async def reap(app: App) -> None:
        """Notice generations whose worker died, and rows no job will end, even when no
        worker is left to do it. Stopping it at shutdown is its normal end, not an error."""
        with contextlib.suppress(asyncio.CancelledError):
            await reap_forever(app)

    async def reap_forever(app: App) -> None:
        svc: Services = app.ctx.services
        sweeper = Sweeper(svc.redis, settings)
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + SWEEP_EVERY
        while True:
            await asyncio.sleep(settings.worker_dead_after / 4)
            try:
                await reap_orphans(svc.redis, settings, max_tries=MAX_TRIES)
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + SWEEP_EVERY
                    await sweeper.sweep()
            except Exception as exc:  # noqa: BLE001 - Redis or the database away: next round
                log.warning("orphan check failed (%s)", type(exc).__name__)

    async def start_reaper(app: App) -> None:
        app.add_task(reap(app), name="haia-reaper")

    async def stop_reaper(app: App) -> None:
        # Stopped on purpose, before the server stops, so shutdown logs no "cancelled" warning.
        await app.cancel_task("haia-reaper", raise_exception=False)

    async def close_resources(app: App) -> None:
        svc: Services = app.ctx.services
        await svc.streams.stop()
        await svc.requests.stop()
        await svc.hub.stop()
        svc.http.close()
        await svc.redis.aclose()
        await close_database()

    app.before_server_start(open_resources)
    app.after_server_start(start_reaper)
    app.before_server_stop(stop_reaper)
    app.after_server_stop(close_resources)


def setup_discovery(app: App) -> None:
    """Ask the upstreams for their models in the background (`app.catalog`)."""

    async def discover(app: App) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await app.ctx.services.catalog.run_forever()

    async def start(app: App) -> None:
        app.add_task(discover(app), name="haia-discovery")

    async def stop(app: App) -> None:
        await app.cancel_task("haia-discovery", raise_exception=False)

    app.after_server_start(start)
    app.before_server_stop(stop)


def setup_errors(app: App) -> None:
    async def render(request: Request, exc: Exception) -> HTTPResponse:
        if refused_by_database(exc):
            # Input the validation let through and the database refuses (a length, a
            # character): the request's fault, not an outage.
            log.warning("the database refused a value on %s: %s", request.path, _cause_name(exc))
            exc = InvalidRequest(
                "A value in the request cannot be stored: it is too long or holds a character "
                "the database refuses.",
                code="invalid_value",
            )
        if _store_down(exc):
            log.warning("storage unavailable on %s: %s", request.path, type(exc).__name__)
            exc = Unavailable(
                "HAIA's database or Redis is unavailable right now; try again shortly.",
                code="storage_unavailable",
            )
        if isinstance(exc, HaiaError):
            return json_response(exc.body(), status=exc.status, headers=exc.headers())
        if isinstance(exc, SanicException) and exc.status_code < 500:
            status = exc.status_code
            message = str(exc) or "Invalid request."
            return json_response(
                error_body(message, type_=_SANIC_TYPES.get(status, "invalid_request_error")),
                status=status,
                headers=_error_headers(request, exc),
            )
        log.exception("unhandled error on %s %s", request.method, request.path)
        message = (
            f"The server had an error processing your request (request id {request_id_var.get()})."
        )
        return json_response(error_body(message, type_="server_error"), status=500)

    app.error_handler.add(Exception, render)


def _cause_name(exc: BaseException) -> str:
    return " <- ".join(type(error).__name__ for error in chain(exc))


def _error_headers(request: Request, exc: SanicException) -> dict[str, str]:
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and "Allow" not in headers:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return headers


def _allowed_methods(request: Request) -> list[str]:
    """The methods the router would accept on this path (Sanic omits them for some routes)."""
    allowed = []
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        try:
            request.app.router.get(request.path, method, request.headers.get("host"))
        except SanicException:
            continue
        allowed.append(method)
    return allowed


def setup_correlation(app: App, settings: Settings) -> None:
    keys_ = [key.get_secret_value().encode() for key in settings.api_keys]

    async def correlate(request: Request) -> None:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        request.ctx.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request_id_var.set(request.ctx.request_id)

    async def authenticate(request: Request) -> None:
        key = _authorized_key(request, keys_) if keys_ else None
        request.ctx.authenticated = key is not None or not keys_
        if not request.ctx.authenticated and not is_public(request):
            raise Unauthorized("Incorrect or missing API key: send Authorization: Bearer <key>.")
        check_text_headers(request)
        request.ctx.owner = owner_of(key, request.headers.get(OPENWEBUI_USER_HEADER))

    async def after(request: Request, response: HTTPResponse) -> None:
        request_id = getattr(request.ctx, "request_id", None)
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id

    app.on_request(correlate, priority=900)
    app.on_request(authenticate, priority=100)
    app.on_response(after)  # type: ignore[no-untyped-call]


TEXT_HEADERS = (OPENWEBUI_USER_HEADER, "X-OpenWebUI-Chat-Id", "X-Conversation-ID")
MAX_TEXT_HEADER = MAX_CHAT_ID
_CONTROL = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")  # surrogates: bytes not UTF-8


def check_text_headers(request: Request) -> None:
    """The headers whose text HAIA stores or looks up: at most 200 characters, valid UTF-8,
    no control characters (a NUL cannot even be stored in PostgreSQL)."""
    for name in TEXT_HEADERS:
        value = request.headers.get(name)
        if value is None:
            continue
        if len(value) > MAX_TEXT_HEADER:
            raise InvalidRequest(f"{name} is longer than {MAX_TEXT_HEADER} characters.", param=name)
        if _CONTROL.search(value):
            raise InvalidRequest(
                f"{name} contains a control character or bytes that are not UTF-8.", param=name
            )


def is_public(request: Request) -> bool:
    """What answers without a key: preflights and OPTIONS, the docs, and the (terse) health."""
    path = request.path
    return (
        request.method == "OPTIONS"
        or path in PUBLIC_PATHS
        or path == DOCS_PREFIX
        or path.startswith(f"{DOCS_PREFIX}/")
    )


def _authorized_key(request: Request, allowed: list[bytes]) -> bytes | None:
    """The configured key the request presents, compared in constant time; None if none."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    given = token.strip().encode()
    matches = [key for key in allowed if hmac.compare_digest(given, key)]
    return matches[0] if matches else None


def owner_of(key: bytes | None, openwebui_user: str | None) -> str:
    """Who owns what a request stores: the API key (by fingerprint, never the key itself),
    and under it OpenWebUI's forwarded user id when there is one."""
    owner = f"key:{hashlib.sha256(key).hexdigest()[:16]}" if key else "anonymous"
    if openwebui_user:
        owner += f"/user:{openwebui_user.strip()[:120]}"
    return owner


def create_app(settings: Settings, *, redis_url: str, name: str = "haia") -> App:
    """The web application for `settings`, talking to Redis at `redis_url`."""
    app: App = Sanic(name, configure_logging=False)
    app.config.update(
        {
            "RESPONSE_TIMEOUT": settings.job_timeout + 60,
            "REQUEST_TIMEOUT": settings.request_timeout,
            "REQUEST_MAX_SIZE": settings.max_body_bytes,
            "KEEP_ALIVE_TIMEOUT": 75,
            "OAS_UI_DEFAULT": "swagger",
            "OAS_TITLE": "HAIA — Homelab AI Assistant",
            "OAS_DESCRIPTION": "OpenAI-compatible chat with durable, streamed generations.",
            "CORS": False,
        }
    )
    Extend(app)
    setup_access(app, settings)
    setup_correlation(app, settings)
    setup_cors(app, settings)
    setup_errors(app)
    setup_resources(app, settings, redis_url)
    setup_discovery(app)
    app.blueprint(
        [
            chat.bp,
            completions.bp,
            responses.bp,
            conversations.bp,
            models.bp,
            health.bp,
            metrics_route.bp,
        ]
    )
    if settings.api_keys:
        secure_operations(app, public=lambda path: path in PUBLIC_PATHS)
    return app
