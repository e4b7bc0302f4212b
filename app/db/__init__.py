"""Database access: Tortoise configuration, start-up and migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tortoise import Tortoise
from tortoise.backends.base.config_generator import expand_db_url
from tortoise.migrations.api.migrate import migrate

APP_LABEL = "haia"


def tortoise_config(database_url: str) -> dict[str, Any]:
    """The Tortoise config for `database_url` (`sqlite://…` or `postgres://…`)."""
    return {
        "connections": {"default": _connection(database_url)},
        "apps": {
            APP_LABEL: {
                "models": ["app.db.models"],
                "default_connection": "default",
                "migrations": "app.db.migrations",
            }
        },
        "use_tz": True,
        "timezone": "UTC",
    }


def _connection(database_url: str) -> str | dict[str, Any]:
    """PostgreSQL as Tortoise opens it; SQLite tuned, on the client that runs statements on
    the event loop's thread (`app.db.sqlite_inline`)."""
    if not database_url.startswith("sqlite://"):
        return database_url
    config = expand_db_url(_tuned(database_url))
    config["engine"] = "app.db.sqlite_inline"
    return config


def _tuned(database_url: str) -> str:
    """SQLite in WAL mode (Tortoise's default) with `synchronous=NORMAL`: a commit does not wait
    for an fsync (two per turn otherwise, milliseconds each on the time to first token), and
    the database stays consistent across a crash; the last commits may be lost only on power
    loss. A `synchronous=` in the URL wins."""
    if not database_url.startswith("sqlite://") or "synchronous=" in database_url:
        return database_url
    return database_url + ("&" if "?" in database_url else "?") + "synchronous=NORMAL"


def ensure_sqlite_dir(database_url: str) -> None:
    if database_url.startswith("sqlite://") and ":memory:" not in database_url:
        path = database_url.removeprefix("sqlite://").split("?", 1)[0]
        Path(path).parent.mkdir(parents=True, exist_ok=True)


async def open_database(database_url: str) -> None:
    """Open the connections (global, so Sanic listeners and handlers share them)."""
    ensure_sqlite_dir(database_url)
    await Tortoise.init(config=tortoise_config(database_url), _enable_global_fallback=True)


async def apply_migrations(database_url: str) -> None:
    """Bring the schema up to date with Tortoise's own migrations."""
    ensure_sqlite_dir(database_url)
    await migrate(config=tortoise_config(database_url))
    await Tortoise.close_connections()


async def close_database() -> None:
    await Tortoise.close_connections()
