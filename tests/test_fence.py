"""One writer per generation, against a real Redis and each database: the fence's rules."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from tortoise import Tortoise
from tortoise.backends.base.executor import EXECUTOR_CACHE

from app import keys
from app.config import Settings
from app.db import apply_migrations, open_database
from app.db.models import Conversation, Message, Status
from app.generations import (
    Ending,
    Sweeper,
    end_as,
    end_run,
    logged_events,
    take_fence,
    ttls,
)
from app.publish import Batcher, Fenced, Publisher
from tests.conftest import REDIS_BASE


@pytest.fixture
async def stores(database_url: str) -> AsyncIterator[aioredis.Redis]:
    # Tortoise caches SQL per connection name across inits: SQLite's would reach PostgreSQL.
    EXECUTOR_CACHE.clear()
    await apply_migrations(database_url)
    await open_database(database_url)
    client = aioredis.Redis.from_url(f"{REDIS_BASE}/15")
    await client.flushdb()
    yield client
    await client.aclose()
    await Tortoise.close_connections()
    EXECUTOR_CACHE.clear()


@pytest.fixture
def settings() -> Settings:
    return Settings()


async def queued_turn() -> Message:
    conversation = await Conversation.create(owner="test")
    await Message.create(conversation=conversation, role="user", content="hello")
    return await Message.create(
        conversation=conversation,
        role="assistant",
        status=Status.QUEUED,
        completion_id=f"chatcmpl-{uuid.uuid4().hex}",
        model="ollama:fake-model",
    )


async def fresh(message: Message) -> Message:
    return await Message.get(id=message.id)


async def test_a_stale_run_can_neither_publish_nor_finish(
    stores: aioredis.Redis, settings: Settings
) -> None:
    message = await queued_turn()
    completion_id = str(message.completion_id)
    stale = await take_fence(stores, settings, message, status=Status.IN_PROGRESS)
    assert stale is not None and stale.token == 1
    old = Publisher(stores, completion_id, stale.token, ttls(settings))
    await old.start()
    old.delta("said by run 1 ")
    await old.flush()

    # Run 1 is taken for dead and the job is run again: run 2 takes the fence.
    rerun = await take_fence(stores, settings, await fresh(message), status=Status.IN_PROGRESS)
    assert rerun is not None and rerun.token == 2
    assert len(await logged_events(stores, completion_id)) == 2  # run 1's start and delta

    old.delta("late words from run 1")
    with pytest.raises(Fenced):
        await old.flush()
    assert not await end_run(old, message, Ending(status=Status.COMPLETED, text="stale"))
    row = await fresh(message)
    assert (row.status, row.content, row.attempt) == (Status.IN_PROGRESS, "", 2)
    # A reaper that saw run 1 does nothing either: a newer run holds the generation.
    assert not await end_as(
        stores, settings, completion_id, status=Status.INTERRUPTED, seen_attempt=1
    )

    new = Publisher(stores, completion_id, rerun.token, ttls(settings))
    new.delta("run 2's answer")
    assert await end_run(new, rerun.message, Ending(status=Status.COMPLETED, text="run 2's answer"))
    row = await fresh(message)
    assert (row.status, row.content) == (Status.COMPLETED, "run 2's answer")

    # Ended: nothing more can end it, claim it or add to it.
    assert not await end_as(stores, settings, completion_id, status=Status.INTERRUPTED)
    assert await take_fence(stores, settings, row, status=Status.IN_PROGRESS) is None
    events = await logged_events(stores, completion_id)
    assert [e.type for e in events] == ["start", "delta", "delta", "end"]
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert "late words" not in "".join(e.text for e in events)
    assert (await fresh(message)).status == Status.COMPLETED


async def test_one_batch_serves_many_generations_and_refuses_a_stale_one(
    stores: aioredis.Redis, settings: Settings
) -> None:
    """The batcher sends every generation's deltas of a tick in one call, fence by fence."""
    batcher = Batcher(stores)
    batcher.start()
    try:
        runs = []
        for _ in range(3):
            message = await queued_turn()
            run = await take_fence(stores, settings, message, status=Status.IN_PROGRESS)
            assert run is not None
            runs.append((str(message.completion_id), run, message))
        publishers = [
            Publisher(stores, cid, run.token, ttls(settings), batcher) for cid, run, _ in runs
        ]
        for publisher in publishers:
            await publisher.start()
        # The second generation's run is superseded before its deltas go out.
        stale_id, _, stale_message = runs[1]
        assert await take_fence(
            stores, settings, await fresh(stale_message), status=Status.IN_PROGRESS
        )
        for i, publisher in enumerate(publishers):
            publisher.delta(f"gen {i} a ")
            publisher.delta(f"gen {i} b")
        for _ in range(100):
            if all(not p.pending for p in publishers) and publishers[1].fenced:
                break
            await asyncio.sleep(0.01)
        assert [p.fenced for p in publishers] == [False, True, False]
        for i in (0, 2):
            events = await logged_events(stores, runs[i][0])
            assert [e.seq for e in events] == [1, 2, 3]
            assert "".join(e.text for e in events) == f"gen {i} a gen {i} b"
        assert [e.type for e in await logged_events(stores, stale_id)] == ["start"]
        # After a Redis restart the script is gone: the batcher loads it again.
        await stores.script_flush()
        publishers[0].delta(" c")
        for _ in range(100):
            if not publishers[0].pending:
                break
            await asyncio.sleep(0.01)
        assert [e.text for e in await logged_events(stores, runs[0][0])][-1] == " c"
    finally:
        await batcher.stop()


async def test_a_batch_carries_any_text_exactly(stores: aioredis.Redis, settings: Settings) -> None:
    """The batch travels as one JSON argument decoded by Redis: quotes, backslashes, escape
    sequences, control characters, emoji and tool-call pieces come out of the log as sent."""
    batcher = Batcher(stores)
    batcher.start()
    try:
        message = await queued_turn()
        run = await take_fence(stores, settings, message, status=Status.IN_PROGRESS)
        assert run is not None
        completion_id = str(message.completion_id)
        publisher = Publisher(stores, completion_id, run.token, ttls(settings), batcher)
        await publisher.start()
        texts = [
            'say "hi"',
            "C:\\new\\table",
            "\\u0000 is not NUL",
            "tab\tline\n",
            "🦙 façade ∑",
            "\x7f\x01",
        ]
        for text in texts:
            publisher.delta(text)
        publisher.reasoning('think "twice"')
        publisher.tool({"index": 0, "function": {"arguments": '{"path": "a\\\\b"}'}})
        for _ in range(100):
            if not publisher.pending:
                break
            await asyncio.sleep(0.01)
        events = await logged_events(stores, completion_id)
        assert [e.text for e in events if e.text] == texts
        assert [e.reasoning for e in events if e.reasoning] == ['think "twice"']
        assert [e.tool for e in events if e.tool] == [
            {"index": 0, "function": {"arguments": '{"path": "a\\\\b"}'}}
        ]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
    finally:
        await batcher.stop()


async def test_progress_goes_with_the_deltas_only_while_the_run_holds_the_fence(
    stores: aioredis.Redis, settings: Settings
) -> None:
    """The token count in `haia:inflight` is written by the batch that carries the deltas,
    and never after the generation ended (it would bring back a finished entry)."""
    batcher = Batcher(stores)
    batcher.start()
    try:
        message = await queued_turn()
        completion_id = str(message.completion_id)
        run = await take_fence(stores, settings, message, status=Status.IN_PROGRESS)
        assert run is not None
        publisher = Publisher(stores, completion_id, run.token, ttls(settings), batcher)
        await publisher.start()
        publisher.progress(json.dumps({"status": "in_progress", "tokens": 16}))
        publisher.delta("a")
        for _ in range(100):
            if not publisher.pending:
                break
            await asyncio.sleep(0.01)
        entry = await stores.hget(keys.INFLIGHT, completion_id)  # type: ignore[misc]
        assert entry is not None and json.loads(entry)["tokens"] == 16
        await stores.hdel(keys.INFLIGHT, completion_id)  # type: ignore[misc]
        assert await end_as(stores, settings, completion_id, status=Status.INTERRUPTED)
        publisher.progress(json.dumps({"status": "in_progress", "tokens": 32}))
        publisher.delta("b")
        for _ in range(100):
            if publisher.fenced:
                break
            await asyncio.sleep(0.01)
        assert publisher.fenced
        assert await stores.hget(keys.INFLIGHT, completion_id) is None  # type: ignore[misc]
    finally:
        await batcher.stop()


async def test_interrupted_never_becomes_completed(
    stores: aioredis.Redis, settings: Settings
) -> None:
    message = await queued_turn()
    completion_id = str(message.completion_id)
    run = await take_fence(stores, settings, message, status=Status.IN_PROGRESS)
    assert run is not None
    publisher = Publisher(stores, completion_id, run.token, ttls(settings))
    await publisher.start()
    publisher.delta("partial ")
    await publisher.flush()
    # The reaper ends it on the (presumed dead) run's behalf.
    assert await end_as(
        stores, settings, completion_id, status=Status.INTERRUPTED, seen_attempt=run.token
    )
    # The run was alive after all and finishes: refused, in the row and in the log.
    assert not await end_run(
        publisher, message, Ending(status=Status.COMPLETED, text="partial and the rest")
    )
    row = await fresh(message)
    assert (row.status, row.content) == (Status.INTERRUPTED, "partial ")
    ends = [e for e in await logged_events(stores, completion_id) if e.is_terminal]
    assert len(ends) == 1 and ends[0].status == "interrupted"


async def test_the_sweep_stores_an_end_the_database_missed(
    stores: aioredis.Redis, settings: Settings
) -> None:
    message = await queued_turn()
    completion_id = str(message.completion_id)
    run = await take_fence(stores, settings, message, status=Status.IN_PROGRESS)
    assert run is not None
    publisher = Publisher(stores, completion_id, run.token, ttls(settings))
    publisher.delta("kept ")
    publisher.delta("whole")
    # The run announced its end but died before the row was written (database away).
    await publisher.end(Ending(status=Status.COMPLETED, text="kept whole").event())
    old = await Message.filter(id=message.id).update(
        created_at=message.created_at.replace(year=2000)
    )
    assert old == 1
    assert await Sweeper(stores, settings).sweep() == [completion_id]
    row = await fresh(message)
    assert (row.status, row.content) == (Status.COMPLETED, "kept whole")
