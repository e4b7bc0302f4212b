"""Which database errors are the request's fault (400) and which an outage (503), as the web's
error handler tells them apart, with the errors real databases raise."""

from __future__ import annotations

import pytest
from tortoise import connections
from tortoise.backends.base.executor import EXECUTOR_CACHE
from tortoise.exceptions import BaseORMException

from app.db import close_database, open_database
from app.db.failures import refused_by_database
from app.db.models import Conversation, Message
from app.server import _STORE_DOWN, _store_down


async def _raised(work: object) -> BaseException:
    try:
        await work  # type: ignore[misc]
    except BaseException as exc:  # noqa: BLE001 - the error is what the test looks at
        return exc
    raise AssertionError("the database took it")


async def test_refused_values_are_the_requests_fault(database: str) -> None:
    conversation = await Conversation.create(owner="test")
    duplicate = await _raised(Conversation.create(id=conversation.id, owner="test"))
    assert refused_by_database(duplicate), repr(duplicate)
    checked = await _raised(Message.create(conversation=conversation, role="r" * 100))
    assert refused_by_database(checked), repr(checked)  # Tortoise's own length check
    if database.startswith("sqlite"):
        return  # SQLite stores any length and NULs
    too_long = await _raised(
        connections.get("default").execute_query(
            "UPDATE haia_conversation SET owner = $1 WHERE id = $2", ["o" * 300, conversation.id]
        )
    )
    assert isinstance(too_long, BaseORMException)
    assert isinstance(too_long, _STORE_DOWN)  # what made it a 503 before
    assert refused_by_database(too_long), repr(too_long)
    nul = await _raised(Message.create(conversation=conversation, role="user", content="a\x00b"))
    assert refused_by_database(nul), repr(nul)


async def test_an_unreachable_database_is_an_outage(database_url: str) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite is a file inside the process: there is no server to lose")
    nowhere = database_url.replace(database_url.split("@", 1)[1].split("/", 1)[0], "127.0.0.1:9")
    EXECUTOR_CACHE.clear()
    await open_database(nowhere)
    try:
        down = await _raised(Conversation.create(owner="test"))
    finally:
        await close_database()
        EXECUTOR_CACHE.clear()
    assert _store_down(down) and not refused_by_database(down), repr(down)
