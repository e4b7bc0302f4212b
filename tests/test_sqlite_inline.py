"""SQLite on the event loop's thread: statements run where they are made; a lock held by
another process is waited for in aiosqlite's thread, with the loop free meanwhile."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.db import tortoise_config
from app.db.sqlite_inline import InlineSqliteClient


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[InlineSqliteClient]:
    config = tortoise_config(f"sqlite://{tmp_path / 'inline.sqlite3'}")["connections"]["default"]
    assert config["engine"] == "app.db.sqlite_inline"  # what HAIA opens SQLite with
    db = InlineSqliteClient(connection_name="test", **config["credentials"])
    await db.create_connection(with_db=True)
    await db.execute_script("CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
    yield db
    await db.close()


def _threads_of(db: InlineSqliteClient) -> list[int]:
    """Registers `probe()` in SQL: each call records the thread it runs on."""
    seen: list[int] = []

    def probe() -> int:
        seen.append(threading.get_ident())
        return 1

    assert db._connection is not None
    db._connection._conn.create_function("probe", 0, probe)
    return seen


async def test_statements_run_on_the_loops_thread(client: InlineSqliteClient) -> None:
    seen = _threads_of(client)
    await client.execute_insert("INSERT INTO item (name) VALUES (?)", ["a"])
    count, rows = await client.execute_query("SELECT probe() AS p, name FROM item", [])
    assert (count, [tuple(row) for row in rows]) == (1, [(1, "a")])
    assert seen == [threading.get_ident()]


async def test_a_locked_database_is_waited_for_off_the_loop(
    client: InlineSqliteClient, tmp_path: Path
) -> None:
    seen = _threads_of(client)
    other = sqlite3.connect(tmp_path / "inline.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process is writing: the write lock is taken
    other.execute("INSERT INTO item (name) VALUES ('other')")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    writing = asyncio.create_task(
        client.execute_many("INSERT INTO item (name) VALUES (?)", [["one"], ["two"], ["three"]])
    )
    await asyncio.sleep(0.3)
    assert not writing.done()  # waiting for the lock ...
    assert ticks >= 10  # ... with the loop running meanwhile
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(writing, 5)
    ticking.cancel()
    # Each row once: the refused attempt changed nothing before the retry.
    _, rows = await client.execute_query("SELECT probe() AS p, name FROM item ORDER BY id", [])
    assert [row["name"] for row in rows] == ["other", "one", "two", "three"]
    assert set(seen) == {threading.get_ident()}  # and the next statements run inline again


async def test_a_wait_that_outlasts_the_busy_timeout_fails_as_before(
    client: InlineSqliteClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.db.sqlite_inline.BUSY_TIMEOUT_MS", 200)
    other = sqlite3.connect(tmp_path / "inline.sqlite3", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Exception, match="locked"):
            await client.execute_insert("INSERT INTO item (name) VALUES (?)", ["late"])
    finally:
        other.execute("ROLLBACK")
        other.close()
    await client.execute_insert("INSERT INTO item (name) VALUES (?)", ["now"])
    _, rows = await client.execute_query("SELECT name FROM item", [])
    assert [row["name"] for row in rows] == ["now"]
