"""SQLite on the event loop's thread: statements run where they are made; a lock held by
another process is waited for in aiosqlite's thread, with the loop free meanwhile."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tortoise.backends.sqlite.client import SqliteTransactionWrapper

from app.db import tortoise_config
from app.db.sqlite_inline import InlineSqliteClient, _locked


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


async def test_a_lock_held_for_a_moment_is_waited_for_on_the_loop(
    client: InlineSqliteClient, tmp_path: Path
) -> None:
    """The other process's write lock usually lasts one transaction's CPU time: the loop asks
    again shortly after, and the statement never goes to aiosqlite's thread."""
    seen = _threads_of(client)
    other = sqlite3.connect(tmp_path / "inline.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO item (name) VALUES ('other')")
    writing = asyncio.create_task(
        client.execute_insert("INSERT INTO item (name) SELECT ? WHERE probe() = 1", ["mine"])
    )
    # Runs after the insert's first attempt was refused, before its first retry.
    asyncio.get_running_loop().call_soon(other.execute, "COMMIT")
    await asyncio.wait_for(writing, 5)
    other.close()
    _, rows = await client.execute_query("SELECT name FROM item ORDER BY id", [])
    assert [row["name"] for row in rows] == ["other", "mine"]
    assert seen and set(seen) == {threading.get_ident()}  # never in aiosqlite's thread


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


async def test_a_cancelled_wait_keeps_the_connection_until_sqlite_answers(
    client: InlineSqliteClient, tmp_path: Path
) -> None:
    """A caller cancelled while its call waits for a lock in aiosqlite's thread leaves that call
    running; the next statement must not touch the connection from the loop meanwhile."""
    other = sqlite3.connect(tmp_path / "inline.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    first = asyncio.create_task(client.execute_insert("INSERT INTO item (name) VALUES (?)", ["a"]))
    await asyncio.sleep(0.1)  # refused inline, now waiting in the thread
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    reading = asyncio.create_task(client.execute_query("SELECT name FROM item", []))
    await asyncio.sleep(0.2)
    assert not reading.done()  # it waits for the cancelled call to be answered ...
    other.execute("COMMIT")
    other.close()
    _, rows = await asyncio.wait_for(reading, 5)
    # ... which SQLite then completed: the cancelled caller's row is there, once.
    assert [row["name"] for row in rows] == ["a"]


async def test_a_script_runs_where_it_may_wait(client: InlineSqliteClient) -> None:
    """A script commits statement by statement, so one refused halfway could not be retried:
    it runs in aiosqlite's thread, with the busy timeout, from the start."""
    seen = _threads_of(client)
    await client.execute_script("INSERT INTO item (name) VALUES ('s'); SELECT probe();")
    assert seen and threading.get_ident() not in seen
    _, rows = await client.execute_query("SELECT name FROM item", [])
    assert [row["name"] for row in rows] == ["s"]


@pytest.mark.parametrize(
    ("code", "locked"),
    [
        (sqlite3.SQLITE_BUSY, True),
        (sqlite3.SQLITE_BUSY | (1 << 8), True),  # SQLITE_BUSY_RECOVERY
        (sqlite3.SQLITE_BUSY | (2 << 8), True),  # SQLITE_BUSY_SNAPSHOT
        (sqlite3.SQLITE_LOCKED | (1 << 8), True),  # SQLITE_LOCKED_SHAREDCACHE
        (sqlite3.SQLITE_READONLY, False),
        (sqlite3.SQLITE_IOERR | (10 << 8), False),
    ],
)
def test_extended_busy_codes_count_as_locked(code: int, locked: bool) -> None:
    exc = sqlite3.OperationalError("refused")
    exc.sqlite_errorcode = code
    assert _locked(exc) is locked


async def test_a_transaction_that_meets_the_other_processs_write_waits_and_commits(
    client: InlineSqliteClient, tmp_path: Path
) -> None:
    """The other process holds the write lock and commits while a transaction waits for it.
    A turn reads before it writes (the conversation's head, then its rows): begun deferred, the
    read would have taken a snapshot, and SQLite refuses to upgrade a stale snapshot to a write
    (SQLITE_BUSY_SNAPSHOT, "database is locked" at once, no busy wait): a continued
    conversation's turn lost with a 503 whenever the worker wrote in between."""
    other = sqlite3.connect(tmp_path / "inline.sqlite3", isolation_level=None)
    await client.execute_insert("INSERT INTO item (name) VALUES (?)", ["before"])
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO item (name) VALUES ('other')")

    async def turn() -> None:
        # What `in_transaction()` runs, without Tortoise's global context.
        transaction = SqliteTransactionWrapper(client)
        await transaction.begin()
        await transaction.execute_query("SELECT name FROM item", [])
        await transaction.execute_insert("INSERT INTO item (name) VALUES (?)", ["first"])
        await transaction.execute_insert("INSERT INTO item (name) VALUES (?)", ["second"])
        await transaction.commit()

    storing = asyncio.create_task(turn())
    await asyncio.sleep(0.2)
    assert not storing.done()  # waiting for the lock
    other.execute("COMMIT")  # the other process's write lands first
    other.close()
    await asyncio.wait_for(storing, 5)
    _, rows = await client.execute_query("SELECT name FROM item ORDER BY id", [])
    assert [row["name"] for row in rows] == ["before", "other", "first", "second"]
