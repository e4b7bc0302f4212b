"""A turn is stored with plain INSERTs: the ORM reads back exactly what it would have written
itself (defaults, timestamps, JSON, order), on each database."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from app.content import BLOB_SCHEME
from app.db import raw
from app.db.models import Blob, Conversation, Message, Status
from app.schemas import ChatMessage
from app.turns import history_digest, new_completion_id, queued_message, start_turn

_PNG = b"\x89PNG\r\n\x1a\n-not-really-an-image"
_IMAGE = {
    "type": "image_url",
    "image_url": {"url": "data:image/png;base64," + base64.b64encode(_PNG).decode()},
}


def _messages(*pairs: tuple[str, object]) -> list[ChatMessage]:
    return [
        ChatMessage.model_validate({"role": role, "content": content}) for role, content in pairs
    ]


async def test_a_new_turn_reads_back_as_the_orm_writes_it(database: str) -> None:
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    before = datetime.now(UTC) - timedelta(seconds=1)
    turn = await start_turn(
        owner=owner,
        completion_id=f"chatcmpl-{uuid.uuid4().hex}",
        messages=_messages(
            ("system", "Be brief."),
            ("user", [{"type": "text", "text": "What is in a name?"}, _IMAGE]),
        ),
        conversation_id=None,
        chat_id=None,
        model="ollama:fake-model",
        request_id="req-1",
    )
    conversation = await Conversation.get(id=turn.conversation_id)
    assert (conversation.owner, conversation.title, conversation.title_from_task) == (
        owner,
        "What is in a name?",
        False,
    )
    assert conversation.parent_id is None  # type: ignore[attr-defined]
    assert before <= conversation.created_at == conversation.updated_at
    rows = await Message.filter(conversation_id=conversation.id).order_by("id")
    assert [(row.role, row.content, row.status) for row in rows] == [
        ("system", "Be brief.", Status.COMPLETED),
        ("user", "What is in a name?", Status.COMPLETED),
        ("assistant", "", Status.QUEUED),
    ]
    system, user, assistant = rows
    assert system.parts is None and user.parts is not None
    reference = user.parts[1]["image_url"]["url"]  # type: ignore[index]
    assert reference == f"{BLOB_SCHEME}{hashlib.sha256(_PNG).hexdigest()}"
    assert (await Blob.get(sha256=reference.removeprefix(BLOB_SCHEME))).data == _PNG
    assert (assistant.completion_id, assistant.model, assistant.request_id) == (
        turn.completion_id,
        "ollama:fake-model",
        "req-1",
    )
    assert (assistant.attempt, assistant.reasoning, assistant.error, assistant.tool_calls) == (
        0,
        "",
        None,
        None,
    )
    assert assistant.prefix_hash is None and user.prefix_hash is not None
    assert int(assistant.created_at.timestamp()) == turn.created
    assert all(before <= row.created_at for row in rows)


async def test_a_resent_history_continues_the_stored_conversation(database: str) -> None:
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    first = await start_turn(
        owner=owner,
        completion_id=f"chatcmpl-{uuid.uuid4().hex}",
        messages=_messages(("user", "Hello")),
        conversation_id=None,
        chat_id=None,
        model="ollama:fake-model",
        request_id="req-1",
    )
    # The answer is stored as the worker stores it: then the client resends it all.
    answered = _messages(("user", "Hello"), ("assistant", "Hi there"))
    await Message.filter(completion_id=first.completion_id).update(
        status=Status.COMPLETED, content="Hi there", prefix_hash=history_digest(answered)
    )
    conversation = await Conversation.get(id=first.conversation_id)
    second = await start_turn(
        owner=owner,
        completion_id=f"chatcmpl-{uuid.uuid4().hex}",
        messages=[*answered, *_messages(("user", "Again"))],
        conversation_id=None,
        chat_id=None,
        model="ollama:fake-model",
        request_id="req-2",
    )
    assert second.conversation_id == first.conversation_id  # found by the resent history
    rows = await Message.filter(conversation_id=first.conversation_id).order_by("id")
    assert [(row.role, row.content) for row in rows] == [
        ("user", "Hello"),
        ("assistant", "Hi there"),
        ("user", "Again"),
        ("assistant", ""),
    ]
    touched = await Conversation.get(id=first.conversation_id)
    assert touched.updated_at >= conversation.updated_at


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
