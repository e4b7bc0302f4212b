"""`python -m app`: apply migrations, then serve the web process."""

from __future__ import annotations

import asyncio

from app.config import load_settings
from app.db import apply_migrations
from app.embedded_redis import ensure_redis
from app.logs import setup_logging
from app.server import create_app


def main() -> None:
    settings = load_settings()
    setup_logging(settings, process="web")
    redis_url = ensure_redis(settings)
    asyncio.run(apply_migrations(settings.database_url))
    app = create_app(settings, redis_url=redis_url)
    app.run(
        host=settings.host,
        port=settings.port,
        single_process=True,
        access_log=False,
        motd=False,
    )
