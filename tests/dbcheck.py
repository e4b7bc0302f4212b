"""Reading what HAIA stored, straight from the database (SQLite file or PostgreSQL)."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import asyncpg

MESSAGE_COLUMNS = (
    "id, role, content, status, completion_id, model, finish_reason, prompt_tokens, "
    "completion_tokens, error, request_id, created_at, started_at, first_token_at, finished_at"
)


async def query(database_url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Run `sql` (placeholders written `$1`, `$2`, …) and return rows as dicts."""
    if database_url.startswith("sqlite://"):
        path = database_url.removeprefix("sqlite://")
        lite_sql = sql
        for index in range(len(args), 0, -1):
            lite_sql = lite_sql.replace(f"${index}", "?")
        return await asyncio.to_thread(_sqlite_rows, path, lite_sql, args)
    conn = await asyncpg.connect(database_url)
    try:
        return [dict(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def _sqlite_rows(path: str, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql, args).fetchall()]


async def messages(database_url: str, conversation_id: str) -> list[dict[str, Any]]:
    return await query(
        database_url,
        f"SELECT {MESSAGE_COLUMNS} FROM haia_message WHERE conversation_id = $1 ORDER BY id",
        conversation_id,
    )


async def message_by_completion(database_url: str, completion_id: str) -> dict[str, Any]:
    rows = await query(
        database_url,
        f"SELECT {MESSAGE_COLUMNS} FROM haia_message WHERE completion_id = $1",
        completion_id,
    )
    assert len(rows) == 1, rows
    return rows[0]


async def wait_for_status(
    database_url: str, completion_id: str, statuses: set[str], within: float = 20
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        row = await message_by_completion(database_url, completion_id)
        if row["status"] in statuses or loop.time() > deadline:
            return row
        await asyncio.sleep(0.05)
