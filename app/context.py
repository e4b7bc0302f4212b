"""The resources the web process opens at start, kept on `app.ctx.services`, typed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import cast

from arq.connections import ArqRedis
from sanic import Request

from app.catalog import Catalog
from app.config import Settings
from app.http1 import SSEClient
from app.hub import EventHub
from app.metrics import RequestCounts
from app.relay import Relay
from app.stream_slots import StreamSlots

STORING_AT_ONCE = 8
"""Requests storing their turn and enqueueing it at the same time, in one web process.

Storing a turn takes a few statements and round trips, each an await. When hundreds of
requests arrive together and all proceed at once, the event loop shares itself among them,
and each one's enqueue waits for nearly all of them. Eight at a time, in order of arrival,
keeps the database busy while the first turns reach the worker after a few turns' work, so
the worker starts them while the web is still storing the rest: the two processes work in
parallel instead of one after the other. The median request waits half as long."""


@dataclass(frozen=True)
class Services:
    settings: Settings
    redis: ArqRedis
    hub: EventHub
    relay: Relay
    http: SSEClient
    """Asks upstreams for their model lists."""
    catalog: Catalog
    streams: StreamSlots
    requests: RequestCounts
    storing: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(STORING_AT_ONCE))
    """Turns being stored and enqueued at once; the others wait their turn (see below)."""


def services(request: Request) -> Services:
    return cast(Services, request.app.ctx.services)
