"""`GET /health`: is the database, Redis, a worker and the model's server there?"""

from __future__ import annotations

import asyncio
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response
from sanic_ext import openapi
from tortoise import connections

from app import keys
from app.context import services
from app.openapi import returns
from app.schemas import HealthReport

bp = Blueprint("health")

CHECK_TIMEOUT = 2.0


async def _check(probe: Any) -> str | None:
    """None when `probe` succeeds in time, else a short reason."""
    try:
        await asyncio.wait_for(probe, CHECK_TIMEOUT)
    except TimeoutError:
        return "timed out"
    except Exception as exc:  # noqa: BLE001 - a health check reports, it does not raise
        return type(exc).__name__
    return None


async def _workers_alive(request: Request) -> None:
    if not await services(request).redis.exists(keys.HEALTH_CHECK):
        raise LookupError("no worker has reported in the last few seconds")


@bp.get("/health")
@openapi.summary("Liveness and readiness of the database, Redis, the workers and the upstream")
@returns(200, HealthReport, "Everything HAIA needs is there")
@returns(503, HealthReport, "The database, Redis or every worker is down")
async def health(request: Request) -> HTTPResponse:
    svc = services(request)
    database = await _check(connections.get("default").execute_query("SELECT 1"))
    redis = await _check(svc.redis.ping())
    workers = "Redis is down" if redis else await _check(_workers_alive(request))
    models = await svc.catalog.models()
    upstream: dict[str, Any] = {"status": "ok" if models else "unreachable", "models": len(models)}
    if svc.catalog.upstream_error and svc.catalog.discovers:
        upstream.update(status="unreachable", detail=svc.catalog.upstream_error)
    checks = {
        "database": {"status": "ok"}
        if database is None
        else {"status": "down", "detail": database},
        "redis": {"status": "ok"} if redis is None else {"status": "down", "detail": redis},
        "workers": {"status": "ok"} if workers is None else {"status": "down", "detail": workers},
        "upstream": upstream,
    }
    ready = database is None and redis is None and workers is None
    return json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )
