"""The resources the web process opens at start, kept on `app.ctx.services`, typed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import httpx
from arq.connections import ArqRedis
from sanic import Request

from app.catalog import Catalog
from app.config import Settings
from app.hub import EventHub
from app.relay import Relay
from app.stream_slots import StreamSlots


@dataclass(frozen=True)
class Services:
    settings: Settings
    redis: ArqRedis
    hub: EventHub
    relay: Relay
    http: httpx.AsyncClient
    catalog: Catalog
    streams: StreamSlots


def services(request: Request) -> Services:
    return cast(Services, request.app.ctx.services)
