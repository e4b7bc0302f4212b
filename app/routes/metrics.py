"""`GET /metrics`: Prometheus text format, covering every web and worker process."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from sanic import Blueprint, HTTPResponse, Request
from sanic.response import raw
from sanic_ext import openapi

from app.context import services
from app.metrics import read_snapshot, render
from app.openapi import errors

bp = Blueprint("metrics")


@bp.get("/metrics")
@openapi.summary("Prometheus metrics of every web and worker process (text format)")
@openapi.description(
    "Counters and histograms are kept in Redis by every process; gauges are read live. "
    "Families: `haia_http_requests_total`, `haia_generations_total`, "
    "`haia_generation_ttft_seconds`, `haia_tokens_total`, `haia_generations_in_flight`, "
    "`haia_queue_depth`, `haia_workers`, and per limited upstream `haia_upstream_running` and "
    "`haia_upstream_waiting`."
)
@openapi.response(200, {"text/plain": str}, "The metrics, in the Prometheus text format")
@errors(503)
async def metrics(request: Request) -> HTTPResponse:
    svc = services(request)
    limited = [u.name for u in svc.settings.upstreams.values() if u.max_concurrent]
    await svc.requests.flush()  # this process's latest counts are in what it shows
    snapshot = await read_snapshot(svc.redis, limited=limited)
    return raw(render(snapshot), content_type=CONTENT_TYPE_LATEST)
