"""`GET /health`: is the database, Redis, a worker and the model's server there?

Workers count as alive by their `haia:worker:*` heartbeat keys, the liveness the reaper trusts,
so the answer is true again as soon as a worker re-registers after a Redis restart. Without a
key (when keys are set) it says only up or down per component; details need a key.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response
from sanic_ext import openapi
from tortoise import connections

from app.context import Services, services
from app.metrics import live_workers
from app.openapi import returns
from app.schemas import Check, HealthReport, Index

bp = Blueprint("health")

CHECK_TIMEOUT = 2.0


async def _check(probe: Any) -> tuple[Any, str | None]:
    """(the probe's result, None) when it succeeds in time, else (None, a short reason)."""
    try:
        return await asyncio.wait_for(probe, CHECK_TIMEOUT), None
    except TimeoutError:
        return None, "timed out"
    except Exception as exc:  # noqa: BLE001 - a health check reports, it does not raise
        return None, type(exc).__name__


UPSTREAM_PROBE_INTERVAL = 10.0
"""Seconds a probe of the upstream answers `/health` for: however often `/health` is asked,
the upstream gets at most one request per interval from each web process."""


class _UpstreamProbe:
    """The last upstream check, shared by every `/health` request of this process."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._at = -UPSTREAM_PROBE_INTERVAL
        self._check: Check | None = None

    async def check(self, svc: Services) -> Check:
        async with self._lock:  # concurrent requests wait for the one probe in flight
            loop = asyncio.get_running_loop()
            if self._check is None or loop.time() - self._at >= UPSTREAM_PROBE_INTERVAL:
                self._check = await _upstream(svc)
                self._at = loop.time()
            return self._check.model_copy()


_probe = _UpstreamProbe()


async def _upstream(svc: Services) -> Check:
    models, error = await _check(svc.catalog.models())
    models = models or []
    reachable = bool(models) and not svc.catalog.all_unreachable and error is None
    check = Check(status="ok" if reachable else "unreachable", models=len(models))
    if error:
        check.detail = f"model discovery {error}"
    elif svc.catalog.upstream_errors:
        check.detail = "; ".join(svc.catalog.upstream_errors)
    return check


async def _workers(svc: Services, redis_down: str | None) -> Check:
    if redis_down:
        return Check(status="down", detail="Redis is down", count=0)
    ids, error = await _check(live_workers(svc.redis))
    if error:
        return Check(status="down", detail=error, count=0)
    if not ids:
        return Check(status="down", detail="no worker heartbeat in Redis", count=0, ids=[])
    return Check(status="ok", count=len(ids), ids=ids)


@bp.get("/")
@openapi.summary("Where the API, the model list, the health report and the docs are")
@openapi.description("Needs no key: the address the README's first command names.")
@returns(200, Index, "HAIA's entry points")
async def index(request: Request) -> HTTPResponse:
    return json_response(Index().model_dump())


@bp.get("/health")
@openapi.summary("Liveness and readiness of the database, Redis, the workers and the upstream")
@openapi.description(
    "Needs no key. With `HAIA_API_KEYS` set and no key sent, each check has only its `status`; "
    "with a key (or without keys configured) it has details: reasons, model and worker counts."
)
@returns(200, HealthReport, "Everything HAIA needs is there")
@returns(503, HealthReport, "The database, Redis or every worker is down")
async def health(request: Request) -> HTTPResponse:
    svc = services(request)
    _, database = await _check(connections.get("default").execute_query("SELECT 1"))
    _, redis = await _check(svc.redis.ping())
    if redis is None and not svc.hub.connected:
        redis = "reconnecting"  # chats need this process's subscription, not only a PING
    checks = {
        "database": Check(status="ok" if database is None else "down", detail=database),
        "redis": Check(status="ok" if redis is None else "down", detail=redis),
        "workers": await _workers(svc, redis),
        "upstream": await _probe.check(svc),
    }
    ready = all(checks[name].status == "ok" for name in ("database", "redis", "workers"))
    report = HealthReport(
        status="ok" if ready else "unavailable",
        auth="on" if svc.settings.api_keys else "off",
        checks=checks if request.ctx.authenticated else _terse(checks),
    )
    return json_response(
        report.model_dump(mode="json", exclude_none=True), status=200 if ready else 503
    )


def _terse(checks: dict[str, Check]) -> dict[str, Check]:
    return {name: Check(status=check.status) for name, check in checks.items()}
