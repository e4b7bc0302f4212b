"""The queued assistant row a generation's job carries (`app.turns.stored_row`) is the row the
worker would read back, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from tortoise.backends.base.executor import EXECUTOR_CACHE

from app.db import apply_migrations, close_database, open_database, raw
from app.db.models import Message
from app.schemas import ChatMessage
from app.turns import new_completion_id, queued_message, start_turn


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[str]:
    EXECUTOR_CACHE.clear()  # Tortoise caches SQL per connection name across inits
    await apply_migrations(database_url)
    await open_database(database_url)
    yield database_url
    await close_database()
    EXECUTOR_CACHE.clear()


@pytest.mark.parametrize("history", [0, 3])
async def test_the_row_a_job_carries_is_the_row_read_back(database: str, history: int) -> None:
    messages = [ChatMessage(role="system", content="be brief")]
    for n in range(history):
        messages += [
            ChatMessage(role="user", content=f"q{n}"),
            ChatMessage(role="assistant", content=f"a{n}"),
        ]
    messages.append(ChatMessage(role="user", content="hello"))
    completion_id = new_completion_id()
    turn = await start_turn(
        owner="stored-test",
        completion_id=completion_id,
        messages=messages,
        conversation_id=None,
        chat_id=None,
        model="ollama:m",
        request_id="req-1",
    )
    assert turn.stored is not None
    carried = json.loads(json.dumps(turn.stored))  # as it crosses Redis in the job
    read = await raw.first(Message, completion_id=completion_id)
    assert read is not None
    built = queued_message(completion_id, carried)
    for name in Message._meta.fields_db_projection:
        assert getattr(built, name) == getattr(read, name), name
    assert built.pk == read.pk
