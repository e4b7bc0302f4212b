"""Group commit: the database work of turns that arrive together, in one transaction.

A turn's writes are small (an INSERT of its rows in the web; the fence's UPDATE and the end's
in the worker), and each committed on its own costs about as much again as the statement:
SQLite writes the pages it changed to its log at every commit, and PostgreSQL flushes its
log. At a few hundred turns a second, most of them arrive while another commits. Here the
units of work handed to `together` in one event-loop tick, or while the previous group was
being written, run one after the other inside one transaction.

A unit is an async function of database statements only (no other waits: the transaction
holds the database's write lock meanwhile). If one fails, the transaction is rolled back:
when the database refused one unit's value (or the unit's own code raised), that unit fails
and the others run together again; when the database cannot be reached, every unit fails
with that error at once (as each would have alone, and none runs twice if a commit's outcome
is unknown); otherwise (a lock, a deadlock) each runs again alone, in a transaction of its
own. Units must therefore have no effect outside the database before they return. A
unit alone in its group runs in a transaction only if it is `atomic`. A caller that stops waiting
before its unit ran takes the unit with it. A unit must not wait for `together` itself: its
group would wait for it.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from tortoise.transactions import in_transaction

from app.db.failures import from_database, refused_by_database, unreachable

T = TypeVar("T")

Unit = Callable[[], Awaitable[Any]]


@dataclass(slots=True)
class _Work:
    unit: Unit
    done: asyncio.Future[Any]
    atomic: bool
    key: str


class Group:
    """The units waiting for the next transaction of one event loop."""

    def __init__(self) -> None:
        self._waiting: list[_Work] = []
        self._writer: asyncio.Task[None] | None = None
        self.transactions = 0
        """Groups written in one transaction so far (for tests and benchmarks)."""

    async def run(
        self, unit: Callable[[], Awaitable[T]], *, atomic: bool = False, key: str = ""
    ) -> T:
        """`unit()`'s result, `unit` having run with the units that arrived with it."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Work(unit, done, atomic, key))
        if self._writer is None:
            # A context of its own: the writer must not run units inside the transaction (or
            # with the request id) of whichever caller happened to start it.
            self._writer = asyncio.get_running_loop().create_task(
                self._write(), name="haia-db-group", context=contextvars.Context()
            )
        return await done

    async def _write(self) -> None:
        group: list[_Work] = []
        try:
            await asyncio.sleep(0)  # the rest of this tick's units join in
            while self._waiting:
                group, self._waiting = self._waiting, []
                await self._run(group)
        finally:
            self._writer = None
            # Cancelled (the loop's end): nothing will run what is left.
            for work in [*group, *self._waiting]:
                if not work.done.done():
                    work.done.cancel()
            self._waiting = []

    async def _run(self, group: list[_Work]) -> None:
        """Run the units of `group` whose callers still wait: one alone, several together."""
        group = [work for work in group if not work.done.done()]  # given up: dropped
        if len(group) == 1:
            await _alone(group[0], transaction=group[0].atomic)
        elif group:
            # In the order of their keys (arrival order within a key): every process then
            # takes the rows of several conversations in the same order, so two groups cannot
            # wait for each other's (a PostgreSQL deadlock, 1 s each).
            group.sort(key=lambda work: work.key)
            await self._together(group)

    async def _together(self, group: list[_Work]) -> None:
        results: list[tuple[_Work, Any]] = []
        running: _Work | None = None
        try:
            async with in_transaction():
                for work in group:
                    if work.done.done():
                        continue  # its caller gave up while the group ran: not run
                    running = work
                    results.append((work, await work.unit()))
                running = None
        except Exception as exc:  # noqa: BLE001 - rolled back; who fails depends on the error
            await self._failed(group, running, exc)
            return
        self.transactions += 1
        for work, result in results:
            if not work.done.done():
                work.done.set_result(result)

    async def _failed(self, group: list[_Work], running: _Work | None, exc: Exception) -> None:
        """The group's transaction failed with `exc` (raised by `running`'s unit, or by the
        transaction's begin or commit when None) and was rolled back."""
        left = [work for work in group if not work.done.done()]
        if unreachable(exc):
            # The database is away (or went away at the commit, which may have happened):
            # each unit would meet the same, and none may run twice.
            for work in left:
                work.done.set_exception(exc)
            return
        if running is not None and (refused_by_database(exc) or not from_database(exc)):
            # The unit's own failure (a value refused, or its own code): it alone fails; the
            # others run together again.
            running.done.set_exception(exc)
            await self._run(left)
            return
        for work in left:  # a lock, a deadlock, a failed commit: each again alone
            await _alone(work, transaction=True)


async def _alone(work: _Work, *, transaction: bool) -> None:
    """Run one unit by itself, in a transaction of its own when it is `atomic` or its group's
    failed (a unit of several statements keeps the all-or-nothing it had in the group)."""
    if work.done.done():
        return  # its caller gave up meanwhile
    try:
        if transaction:
            async with in_transaction():
                result = await work.unit()
        else:
            result = await work.unit()
    except Exception as exc:  # noqa: BLE001 - the caller's to handle
        if not work.done.done():
            work.done.set_exception(exc)
        return
    if not work.done.done():
        work.done.set_result(result)


_groups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Group] = weakref.WeakKeyDictionary()


def group() -> Group:
    """The running event loop's group."""
    loop = asyncio.get_running_loop()
    found = _groups.get(loop)
    if found is None:
        found = _groups[loop] = Group()
    return found


async def together(unit: Callable[[], Awaitable[T]], *, atomic: bool = False, key: str = "") -> T:
    """Run `unit` in the same transaction as the other units of this moment (see the module).
    `key`: the conversation whose rows `unit` updates (units run in the order of their keys).
    An `atomic` unit that finds itself alone runs in a transaction of its own; another runs
    statement by statement, as it would without this module."""
    return await group().run(unit, atomic=atomic, key=key)
