"""`python -m app`: apply migrations once, then serve the web process (or HAIA_WEB_WORKERS)."""

from __future__ import annotations

import asyncio

from sanic import Sanic

from app.config import load_settings
from app.db import apply_migrations
from app.embedded_redis import ensure_redis
from app.logs import setup_logging
from app.server import create_app


def main() -> None:
    settings = load_settings()
    setup_logging(settings, process="web")
    # Both happen once, in this process, before any worker starts: the embedded Redis (when
    # needed) lives as long as this process, and no two workers race to migrate.
    redis_url = ensure_redis(settings)
    asyncio.run(apply_migrations(settings.database_url))
    app = create_app(settings, redis_url=redis_url)
    if settings.web_workers > 1:
        # Forked workers start at once with everything imported and inherit the app (each
        # opens its own Redis and database pools at start); spawned ones would import it all
        # again. Nothing is open here: the migration's loop and connections are closed.
        Sanic.start_method = "fork"
    app.run(
        host=settings.host,
        port=settings.port,
        single_process=settings.web_workers == 1,
        workers=settings.web_workers,
        access_log=False,
        motd=False,
    )
