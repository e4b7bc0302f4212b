"""The statements of every turn, and the sweep, find their rows through an index, on SQLite and
PostgreSQL alike: none walks the message table, which holds every message ever stored.

Before the indexes of migration 0005, a new conversation's context read walked the whole table
back from the turn's id (`ORDER BY id DESC LIMIT 21` found its one message at once, then looked
for twenty more to the start of the table), and the sweep read every row every few seconds.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import pytest
from tortoise import connections
from tortoise.transactions import in_transaction

from app.db import raw
from app.db.models import Conversation, Message, Status
from app.generations import last_digested_before, stuck_candidates
from app.routes.chat import active_generations
from app.routes.conversations import conversation_page, message_counts
from app.turns import head_sql
from workers.context import _whole_sql, _window_sql

pytestmark = pytest.mark.usefixtures("database")


def _postgres() -> bool:
    return bool(connections.get("default").capabilities.dialect == "postgres")


def _scans(plan: str, table: str) -> bool:
    """SQLite's plan reads all of `table` (`SCAN TABLE t` before SQLite 3.36, `SCAN t` since)."""
    return re.search(rf"SCAN (TABLE )?{table}\b", plan) is not None


async def _plan(sql: str, values: list[object] | None = None) -> str:
    """The database's plan for `sql`, as text. PostgreSQL is told not to scan tables (on a
    table this small a scan is cheapest, which says nothing about a large one)."""
    db = connections.get("default")
    if _postgres():
        async with in_transaction() as conn:
            await conn.execute_script("SET LOCAL enable_seqscan = off")
            _, rows = await conn.execute_query(f"EXPLAIN {sql}", values or [])
            return "\n".join(str(row[0]) for row in rows)
    _, rows = await db.execute_query(f"EXPLAIN QUERY PLAN {sql}", values or [])
    return "\n".join(str(row[3]) for row in rows)


def _uses_index_on(plan: str, column: str, table: str = "haia_message") -> bool:
    """The plan finds `table`'s rows through an index whose first column is `column`."""
    if _postgres():
        return any("Index Cond" in line and column in line for line in plan.splitlines())
    return f"({column}=?" in plan and not _scans(plan, table)


def _uses_conversation_index(plan: str) -> bool:
    return _uses_index_on(plan, "conversation_id")


async def _assistant() -> Message:
    """An answered turn (not left queued: the sweeps of other tests share this database)."""
    conversation = await Conversation.create(owner=f"plans-{uuid.uuid4().hex[:8]}")
    await Message.create(conversation=conversation, role="user", content="hi", prefix_hash="a")
    return await Message.create(
        conversation=conversation,
        role="assistant",
        content="hello",
        status=Status.COMPLETED,
        completion_id=f"c-{uuid.uuid4().hex}",
    )


async def test_a_turns_context_window_is_read_through_the_conversation_index() -> None:
    assistant = await _assistant()
    statement = raw.Statement(connections.get("default"), Message)
    sql = _window_sql(statement, assistant, 20)
    plan = await _plan(sql, statement.values)
    # Both halves (the window and the latest system message) use it.
    assert plan.count("conversation_id") >= 2, plan
    assert _uses_conversation_index(plan), plan


async def test_a_responses_turns_whole_chain_is_read_through_the_conversation_index() -> None:
    assistant = await _assistant()
    statement = raw.Statement(connections.get("default"), Message)
    sql = _whole_sql(statement, assistant)
    assert _uses_conversation_index(await _plan(sql, statement.values))


async def test_a_conversations_head_and_an_endings_digest_use_the_conversation_index() -> None:
    assistant = await _assistant()
    statement = raw.Statement(connections.get("default"), Message)
    sql = head_sql(statement, str(assistant.conversation_id))  # type: ignore[attr-defined]
    assert _uses_conversation_index(await _plan(sql, statement.values))
    earlier = last_digested_before(assistant).sql(params_inline=True)
    assert _uses_conversation_index(await _plan(earlier))


async def test_the_sweep_reads_only_the_rows_still_active() -> None:
    await _assistant()
    plan = await _plan(stuck_candidates(datetime.now(UTC), limit=200).sql(params_inline=True))
    assert _uses_index_on(plan, "status"), plan


async def test_a_requests_admission_counts_only_the_owners_active_generations() -> None:
    """Every chat request counts its owner's queued and running generations
    (HAIA_MAX_CONCURRENT_PER_OWNER): through the index on status, not all their messages."""
    assistant = await _assistant()
    conversation = await Conversation.get(id=assistant.conversation_id)  # type: ignore[attr-defined]
    # A homelab's one owner with a history: the planners must see that the owner's rows are
    # many and the active ones few (PostgreSQL from its statistics).
    await Message.bulk_create(
        [
            Message(conversation=conversation, role="assistant", content="old", status="completed")
            for _ in range(500)
        ]
    )
    if _postgres():
        await connections.get("default").execute_script("ANALYZE")
    plan = await _plan(active_generations(conversation.owner).sql(params_inline=True))
    assert _uses_index_on(plan, "status"), plan


async def test_a_page_of_conversations_is_read_in_order_from_the_owners_index() -> None:
    """The page is read from the index in its order (no sort of all the owner's
    conversations), and its message counts through the conversation index."""
    assistant = await _assistant()
    conversation = await Conversation.get(id=assistant.conversation_id)  # type: ignore[attr-defined]
    for after in (None, conversation):
        page = conversation_page(conversation.owner, after, 21).sql(params_inline=True)
        plan = await _plan(page)
        assert _uses_index_on(plan, "owner", "haia_conversation"), plan
        assert ("Sort" if _postgres() else "TEMP B-TREE") not in plan, plan
    counts = message_counts([conversation.id, "another"]).sql(params_inline=True)
    assert _uses_conversation_index(await _plan(counts))
