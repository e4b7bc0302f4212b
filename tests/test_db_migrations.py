"""Every migration keeps the rows stored before it, on SQLite and PostgreSQL.

Worth a test of its own: a migration that alters a field makes Tortoise rebuild an SQLite table
(create, copy, drop the old one), and dropping `haia_conversation` cascades to every message.
A first draft of 0005 did exactly that and emptied `haia_message`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tortoise import connections
from tortoise.migrations.api.migrate import migrate

from app.db import apply_migrations, close_database, open_database, tortoise_config
from tests.conftest import empty_database

MIGRATIONS = sorted(
    path.stem for path in (Path(__file__).parent.parent / "app" / "db" / "migrations").glob("0*.py")
)


@pytest.fixture(params=["sqlite", "postgres"])
async def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database of each kind of this test's own (the session's is migrated already)."""
    async with empty_database(request.param, tmp_path) as url:
        yield url


async def _store_a_conversation(database_url: str, number: int) -> None:
    """A conversation with a user and an assistant message, in the columns of the first
    migration (later ones add columns with defaults)."""
    await open_database(database_url)
    try:
        db = connections.get("default")
        postgres = db.capabilities.dialect == "postgres"

        def mark(n: int) -> str:
            return f"${n}" if postgres else "?"

        conversation = f"conv-{number}"
        await db.execute_query(
            'INSERT INTO "haia_conversation" ("id", "owner", "title", "title_from_task",'
            ' "created_at", "updated_at")'
            f" VALUES ({mark(1)}, 'o', '', false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
            [conversation],
        )
        for role in ("user", "assistant"):
            await db.execute_query(
                'INSERT INTO "haia_message" ("conversation_id", "role", "content", "status",'
                f" \"created_at\") VALUES ({mark(1)}, {mark(2)}, {mark(3)}, 'completed',"
                " CURRENT_TIMESTAMP)",
                [conversation, role, f"{role} {number}"],
            )
    finally:
        await close_database()


async def _counts(database_url: str) -> tuple[int, int]:
    await open_database(database_url)
    try:
        db = connections.get("default")
        _, conversations = await db.execute_query('SELECT COUNT(*) FROM "haia_conversation"')
        _, messages = await db.execute_query('SELECT COUNT(*) FROM "haia_message"')
        return int(conversations[0][0]), int(messages[0][0])
    finally:
        await close_database()


async def test_every_migration_keeps_the_rows_stored_before_it(empty_database_url: str) -> None:
    config = tortoise_config(empty_database_url)
    await migrate(config=config, target=f"haia.{MIGRATIONS[0]}")
    await close_database()
    for number, name in enumerate(MIGRATIONS[1:], start=1):
        await _store_a_conversation(empty_database_url, number)
        await migrate(config=config, target=f"haia.{name}")
        await close_database()
        assert await _counts(empty_database_url) == (number, 2 * number), f"after {name}"
    await apply_migrations(empty_database_url)  # nothing left to apply
    assert await _counts(empty_database_url) == (len(MIGRATIONS) - 1, 2 * (len(MIGRATIONS) - 1))
