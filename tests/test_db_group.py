"""Group commit (`app.db.group`) against real SQLite and PostgreSQL: the units of one moment
share one transaction, a failing unit fails alone, a given-up unit never runs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from tortoise import connections
from tortoise.exceptions import IntegrityError

from app.db import raw
from app.db.group import group, together
from app.db.models import Conversation


def _row(conversation_id: str) -> dict[str, object]:
    return {"id": conversation_id, "owner": "group-test", "title": ""}


def _inserting(runs: list[str], conversation_id: str) -> Callable[[], Awaitable[None]]:
    """A unit that notes its run in `runs`, then inserts the conversation."""

    async def insert() -> None:
        runs.append(conversation_id)
        await raw.insert(Conversation, [_row(conversation_id)])

    return insert


async def _exists(conversation_id: str) -> bool:
    return await Conversation.filter(id=conversation_id).exists()


async def test_units_of_one_moment_share_one_transaction(database: str) -> None:
    seen: list[object] = []

    def unit(conversation_id: str) -> Callable[[], Awaitable[str]]:
        async def insert() -> str:
            seen.append(connections.get("default"))
            await raw.insert(Conversation, [_row(conversation_id)])
            return conversation_id

        return insert

    before = group().transactions
    ids = [f"conv-group-{n}-{id(seen)}" for n in range(5)]
    results = await asyncio.gather(*(together(unit(i)) for i in ids))
    assert results == ids
    assert group().transactions == before + 1
    assert len({id(connection) for connection in seen}) == 1  # one transaction's connection
    assert seen[0] is not connections.get("default")  # not the plain connection
    assert all([await _exists(i) for i in ids])


async def test_a_failing_unit_fails_alone_and_the_others_are_kept(database: str) -> None:
    taken = f"conv-taken-{id(database)}"
    await raw.insert(Conversation, [_row(taken)])
    first, last = f"conv-first-{id(taken)}", f"conv-last-{id(taken)}"
    runs: list[str] = []
    outcomes = await asyncio.gather(
        together(_inserting(runs, first)),
        together(_inserting(runs, taken)),  # a duplicate key
        together(_inserting(runs, last)),
        return_exceptions=True,
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], IntegrityError)
    assert await _exists(first) and await _exists(last)
    # Together first (rolled back at the duplicate); then the others together again.
    assert runs == [first, taken, first, last]


async def test_an_unreachable_database_fails_the_whole_group_at_once(database: str) -> None:
    """Every unit would meet the same outage: they all fail with it, none runs again, and
    nothing of the rolled-back group is kept."""
    before, after = f"conv-before-{id(database)}", f"conv-after-{id(database)}"
    runs: list[str] = []

    async def lost() -> None:
        runs.append("lost")
        raise ConnectionError("the database went away")

    outcomes = await asyncio.gather(
        together(_inserting(runs, before)),
        together(lost),
        together(_inserting(runs, after)),
        return_exceptions=True,
    )
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes), outcomes
    assert runs == [before, "lost"]
    assert not await _exists(before) and not await _exists(after)


async def test_another_database_error_runs_each_unit_again_alone(database: str) -> None:
    """Neither a refused value nor an outage (here a statement the database cannot run; in
    life a deadlock or a lock): each unit again in a transaction of its own."""
    first, last = f"conv-1st-{id(database)}", f"conv-3rd-{id(database)}"
    runs: list[str] = []

    async def broken() -> None:
        runs.append("broken")
        await connections.get("default").execute_query("UPDATE no_such_table SET x = 1")

    outcomes = await asyncio.gather(
        together(_inserting(runs, first)),
        together(broken),
        together(_inserting(runs, last)),
        return_exceptions=True,
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], Exception)
    assert runs == [first, "broken", first, "broken", last]
    assert await _exists(first) and await _exists(last)


async def test_a_unit_given_up_while_its_group_runs_is_not_run(database: str) -> None:
    ran: list[str] = []
    running, go_on = asyncio.Event(), asyncio.Event()

    async def long() -> None:
        ran.append("long")
        running.set()
        await go_on.wait()  # holds the group until the test has given up on `later`

    async def later() -> None:
        ran.append("later")

    first = asyncio.ensure_future(together(long))
    second = asyncio.ensure_future(together(later))
    await running.wait()  # both are in the group, and its first unit runs
    second.cancel()
    go_on.set()
    await first
    assert ran == ["long"]
    assert second.cancelled()


async def test_a_unit_given_up_before_it_ran_never_runs(database: str) -> None:
    ran: list[str] = []

    async def unit() -> None:
        ran.append("ran")

    waiter = asyncio.ensure_future(together(unit))
    await asyncio.sleep(0)  # queued, not run yet (the group waits for the tick's others)
    waiter.cancel()
    await together(unit)  # the next one still runs
    assert ran == ["ran"]
    assert waiter.cancelled()


async def test_an_atomic_unit_alone_is_all_or_nothing(database: str) -> None:
    atomic_id, plain_id = f"conv-atomic-{id(database)}", f"conv-plain-{id(database)}"

    def unit(conversation_id: str) -> Callable[[], Awaitable[None]]:
        async def insert_then_fail() -> None:
            await raw.insert(Conversation, [_row(conversation_id)])
            raise RuntimeError("after the first statement")

        return insert_then_fail

    with pytest.raises(RuntimeError):
        await together(unit(atomic_id), atomic=True)
    assert not await _exists(atomic_id)  # rolled back
    with pytest.raises(RuntimeError):
        await together(unit(plain_id))
    assert await _exists(plain_id)  # statement by statement, as without the group


async def test_a_group_runs_in_the_order_of_its_keys(database: str) -> None:
    """Every process takes several conversations' rows in the same order (no deadlock between
    two groups); units with the same key keep their arrival order."""
    ran: list[str] = []

    def unit(name: str) -> Callable[[], Awaitable[None]]:
        async def record() -> None:
            ran.append(name)

        return record

    arrivals = [("b1", "conv-b"), ("a1", "conv-a"), ("b2", "conv-b"), ("-", ""), ("a2", "conv-a")]
    await asyncio.gather(*(together(unit(name), key=key) for name, key in arrivals))
    assert ran == ["-", "a1", "a2", "b1", "b2"]
