"""SQLite statements run on the event loop's own thread; only a wait for a lock leaves it.

Tortoise reaches SQLite through aiosqlite, which runs every call in a thread of its own and
hands the result back to the loop. A statement takes tens of microseconds, but each of those
hand-overs needs the thread to get the GIL from the loop, and a loop serving hundreds of
streams rarely lets it go: at 100 simultaneous turns a hop cost up to the interpreter's switch
interval (5 ms), and a turn makes half a dozen of them in the web and in the worker.

Here the call runs where it is made. SQLite is asked not to wait for locks (busy timeout 0),
so the loop never blocks on another process: when the database is locked (the other process
is writing), the same call is made again a few times from the loop after short sleeps
(`INLINE_RETRIES`: the other process's lock lasts the CPU time of one transaction), then in
aiosqlite's thread with the usual busy timeout, and the loop goes on meanwhile. Retrying is
safe: a statement refused with SQLITE_BUSY has changed nothing (Tortoise runs `executemany`
inside BEGIN, so no row of it was committed).

Transactions hold their lock only for the CPU time of their statements (no hop between them),
so the other process rarely has to wait at all. They begin with `BEGIN IMMEDIATE`, taking the
write lock first: a deferred transaction whose first write found the lock taken would keep
the snapshot of that attempt, and once the other process committed, SQLite would refuse the
retry (SQLITE_BUSY_SNAPSHOT) instead of waiting. An immediate BEGIN that finds the lock taken
has read nothing, so it is retried like any other statement.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

import aiosqlite
from aiosqlite.context import contextmanager
from tortoise.backends.sqlite.client import SqliteClient

BUSY_TIMEOUT_MS = 5000
"""How long a call that found the database locked waits for it, in aiosqlite's thread (the
busy timeout sqlite3 and Tortoise use by default)."""

INLINE_RETRIES = (0.0002, 0.0005, 0.001)
"""Seconds between the loop's own attempts at a statement the database refused as locked;
then it waits in aiosqlite's thread."""

_LOCKED = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def _locked(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    # Extended codes (SQLITE_BUSY_RECOVERY, SQLITE_LOCKED_SHAREDCACHE, ...) keep the primary
    # code in their low byte.
    return code is not None and code & 0xFF in _LOCKED


class InlineConnection(aiosqlite.Connection):
    """An aiosqlite connection whose calls run on the caller's thread unless they must wait."""

    _waited: asyncio.Future[Any] | None = None
    """The call now waiting for a lock in aiosqlite's thread, if any. Until it is done, no
    other call may touch the connection, even if the caller that made it was cancelled."""

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        await self._thread_done()
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        try:
            return fn(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            if not _locked(exc):
                raise
        # The other process holds its lock for the CPU time of one transaction: a moment
        # later it is usually free. Asked again from the loop a few times (the caller still
        # holds the client's lock, so no other statement comes between), before waiting in
        # the thread, where SQLite's own busy handler sleeps 1 ms, then 2, then 5.
        for delay in INLINE_RETRIES:
            await asyncio.sleep(delay)
            await self._thread_done()
            try:
                return fn(*args, **kwargs)
            except sqlite3.OperationalError as exc:
                if not _locked(exc):
                    raise
        return await self._off_the_loop(fn, args, kwargs)

    @contextmanager
    async def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> aiosqlite.Cursor:
        if sql == "BEGIN":  # what Tortoise sends for a transaction and for `executemany`
            sql = "BEGIN IMMEDIATE"
        cursor = await self._execute(
            self._conn.execute, sql, [] if parameters is None else parameters
        )
        return aiosqlite.Cursor(self, cursor)

    @contextmanager
    async def executescript(self, sql_script: str) -> aiosqlite.Cursor:
        # A script commits statement by statement: one refused halfway could not be run again
        # from the start, so it always runs where it may wait.
        cursor = await self._off_the_loop(self._conn.executescript, (sql_script,), {})
        return aiosqlite.Cursor(self, cursor)

    async def _thread_done(self) -> None:
        """Wait until no call waits in aiosqlite's thread (never cancelling it: its outcome is
        its caller's)."""
        while self._waited is not None:
            await asyncio.wait([self._waited])

    async def _off_the_loop(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        await self._thread_done()
        waited = asyncio.ensure_future(super()._execute(self._waiting, fn, args, kwargs))  # type: ignore[no-untyped-call]
        self._waited = waited
        waited.add_done_callback(self._waited_done)
        # A cancelled caller leaves the call running: the connection stays taken until SQLite
        # has answered it.
        return await asyncio.shield(waited)

    def _waited_done(self, waited: asyncio.Future[Any]) -> None:
        if self._waited is waited:
            self._waited = None
        if not waited.cancelled():
            waited.exception()  # retrieved: a cancelled caller's failure is not "never retrieved"

    def _waiting(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """`fn`, allowed to wait for a lock (run in aiosqlite's thread)."""
        self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        try:
            return fn(*args, **kwargs)
        finally:
            self._conn.execute("PRAGMA busy_timeout = 0")


class InlineSqliteClient(SqliteClient):
    """Tortoise's SQLite client on an `InlineConnection`: same pragmas, same behaviour."""

    async def create_connection(self, with_db: bool) -> None:
        if self._connection:
            return
        filename = self.filename

        def connector() -> sqlite3.Connection:
            # Created in aiosqlite's thread, used from the loop's (and that thread's only
            # while the loop waits for it): never from two threads at once.
            return sqlite3.connect(
                filename, isolation_level=None, check_same_thread=False, timeout=0
            )

        connection = InlineConnection(connector, iter_chunk_size=64)
        self._connection = await connection
        self._connection._conn.row_factory = sqlite3.Row
        for pragma, value in self.pragmas.items():
            cursor = await self._connection.execute(f"PRAGMA {pragma}={value}")
            await cursor.close()
        await self._post_connect()


client_class = InlineSqliteClient
