"""Storing a chat turn: which conversation it belongs to, what is new in it, and the pending
assistant message the worker will fill.

A request belongs to the conversation named by `X-Conversation-ID`, else by the client's chat
id (`X-OpenWebUI-Chat-Id`), else to the conversation whose stored messages are exactly the
history the request resends, else to a new one. Only what is new is stored. A resent history
that differs from what is stored (an edit, a regeneration) starts a branch: a new conversation
linked to the old one, which is never rewritten.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tortoise import timezone
from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from app.content import identity, stored_parts, tool_calls_json
from app.db import raw
from app.db.group import together
from app.db.models import Blob, ChatLink, Conversation, Message, Status, new_conversation_id
from app.errors import InvalidRequest, NotFound
from app.schemas import ChatMessage

_STORED_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
TITLE_LENGTH = 80


def new_completion_id() -> str:
    return f"chatcmpl-{secrets.token_urlsafe(18)}"


_COMPLETION_ID = re.compile(r"^chatcmpl-[A-Za-z0-9_-]{1,55}$")
_CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_CHAT_ID = 200


def looks_like_completion_id(value: str) -> bool:
    return bool(_COMPLETION_ID.match(value))


def looks_like_conversation_id(value: str) -> bool:
    return bool(_CONVERSATION_ID.match(value))


def digest(previous: str | None, role: str, content: str) -> str:
    """The prefix digest of a conversation after one more message."""
    data = f"{previous or ''}\x1f{role}\x1f{content}".encode()
    return hashlib.sha256(data).hexdigest()


def history_digest(messages: Sequence[ChatMessage]) -> str | None:
    value: str | None = None
    for message in messages:
        if message.role in _STORED_ROLES:
            value = digest(value, _STORED_ROLES[message.role], identity(message))
    return value


def title_from(messages: Sequence[ChatMessage]) -> str:
    for message in messages:
        if message.role == "user" and message.text.strip():
            return clip_title(message.text)
    return ""


def clip_title(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TITLE_LENGTH else text[: TITLE_LENGTH - 1] + "…"


@dataclass(frozen=True)
class Turn:
    conversation_id: str
    completion_id: str
    model: str
    created: int
    stored: dict[str, Any] | None = None
    """What the generation's job carries of the queued assistant row (`stored_row`), so that
    its worker need not read it back; None for a turn that stores nothing."""


async def head_digest(conversation: Conversation) -> str | None:
    """The digest of everything stored in `conversation` so far."""
    rows = await raw.values(Message, lambda s: head_sql(s, str(conversation.id)))
    return str(rows[0][0]) if rows else None


def head_sql(s: raw.Statement, conversation_id: str) -> str:
    """The query of `head_digest`: the conversation's last message that has a digest."""
    return (
        f"SELECT {s.column('prefix_hash')} FROM {raw.table(Message)} "
        f"WHERE {s.where({'conversation_id': conversation_id})} "
        f"AND {s.column('prefix_hash')} IS NOT NULL ORDER BY {s.column('id')} DESC LIMIT 1"
    )


async def _new_conversation(*, owner: str, title: str) -> Conversation:
    """A new, empty conversation (one plain INSERT: the ORM's `create` costs several times
    the statement on a turn's path)."""
    now = timezone.now()
    row: dict[str, Any] = {
        "id": new_conversation_id(),
        "owner": owner,
        "title": title,
        "title_from_task": False,
        "parent_id": None,
        "created_at": now,
        "updated_at": now,
    }
    await raw.insert(Conversation, [row])
    return Conversation._init_from_db(**row)


async def conversation_for_chat(owner: str, chat_id: str, *, title: str = "") -> Conversation:
    """The conversation a client chat id points at, created (race-safely) if it has none."""
    for _ in range(3):
        link = await ChatLink.get_or_none(owner=owner, external_id=chat_id).prefetch_related(
            "conversation"
        )
        if link is not None:
            return link.conversation
        try:
            async with in_transaction():
                conversation = await Conversation.create(owner=owner, title=title)
                await ChatLink.create(owner=owner, external_id=chat_id, conversation=conversation)
            return conversation
        except IntegrityError:
            continue  # the other request of the race created it
    raise RuntimeError(f"could not resolve chat id {chat_id!r}")


async def _find(
    *, owner: str, conversation_id: str | None, chat_id: str | None, history_hash: str | None
) -> Conversation | None:
    if conversation_id is not None:
        found = None
        if looks_like_conversation_id(conversation_id):
            found = await Conversation.get_or_none(id=conversation_id, owner=owner)
        if found is None:
            raise NotFound(
                f"No conversation {conversation_id!r} exists.", param="X-Conversation-ID"
            )
        return found
    if chat_id is not None:
        if len(chat_id) > MAX_CHAT_ID:
            raise InvalidRequest(
                f"X-OpenWebUI-Chat-Id is longer than {MAX_CHAT_ID} characters.",
                param="X-OpenWebUI-Chat-Id",
            )
        return await conversation_for_chat(owner, chat_id)
    if history_hash is None:
        return None
    match = (
        await Message.filter(prefix_hash=history_hash, conversation__owner=owner)
        .order_by("-id")
        .prefetch_related("conversation")
        .first()
    )
    return match.conversation if match else None


def new_turn_length(messages: Sequence[ChatMessage]) -> int:
    """How many trailing messages are the new turn: the last user message, or every tool
    result after the assistant's tool calls."""
    count = 0
    for message in reversed(messages):
        if message.role != "tool":
            break
        count += 1
    return count or 1


def _has_dialogue(history: Sequence[ChatMessage]) -> bool:
    return any(message.role in ("user", "assistant", "tool") for message in history)


OnCreated = Callable[[Conversation, datetime], Awaitable[None]]
"""Called inside the turn's transaction, once the assistant row exists, with its creation
time (e.g. to store the Responses API's record of it)."""


async def start_turn(
    *,
    owner: str,
    completion_id: str,
    messages: list[ChatMessage],
    conversation_id: str | None,
    chat_id: str | None,
    model: str,
    request_id: str,
    on_created: OnCreated | None = None,
) -> Turn:
    """Store what is new in this request and a queued assistant turn; return the turn."""
    turn_length = new_turn_length(messages)
    history = messages[:-turn_length]
    history_hash = history_digest(history) if _has_dialogue(history) else None
    found = await _find(
        owner=owner, conversation_id=conversation_id, chat_id=chat_id, history_hash=history_hash
    )

    async def store() -> Turn:
        conversation = found
        incoming = messages
        head: str | None = None  # what `conversation` holds (new: nothing)
        if conversation is None:
            conversation = await _new_conversation(owner=owner, title=title_from(messages))
        else:
            head = await head_digest(conversation)
            if head is not None and (history_hash is None or history_hash == head):
                # The client resent what is stored, or sent only the turn.
                incoming = messages[-turn_length:]
            elif head is not None:
                conversation = await _branch(conversation, owner=owner, chat_id=chat_id)
                head = None  # a branch starts empty
            if not conversation.title:
                # Only where still untitled: a title task racing this turn may have named it.
                await raw.update(
                    Conversation, {"title": title_from(messages)}, id=conversation.id, title=""
                )
            await _touch(conversation)
        rows = await _message_rows(
            conversation, incoming, offset=len(messages) - len(incoming), head=head
        )
        return await _store_turn(conversation, rows, completion_id, model, request_id, on_created)

    # One transaction, shared with the turns stored at the same moment (one commit for all).
    return await together(store, atomic=True, key=found.id if found is not None else "")


async def start_chain_turn(
    *,
    owner: str,
    completion_id: str,
    messages: list[ChatMessage],
    after: Message | None,
    model: str,
    request_id: str,
    on_created: OnCreated | None = None,
    own: bool = False,
) -> Turn:
    """A turn that continues the conversation of `after` (a stored response's assistant row),
    storing every message as new; or, without `after`, starts a conversation of its own.

    When `after` is no longer its conversation's last turn (a chain forked from an earlier
    response), or the turn must have a conversation of its `own` (it will be deleted with
    it), the conversation up to `after` is copied into a branch first.
    """

    async def store() -> Turn:
        turn_messages = messages
        if after is None:
            conversation = await _new_conversation(owner=owner, title=title_from(messages))
        else:
            conversation = await Conversation.get(
                id=after.conversation_id  # type: ignore[attr-defined]
            )
            later = await Message.filter(conversation=conversation, id__gt=after.id).exists()
            if later or own:
                conversation = await _fork(conversation, owner=owner, upto=after.id)
            await _touch(conversation)
        if after is not None and turn_messages and _restates(turn_messages[0], after):
            turn_messages = turn_messages[1:]
        head = await head_digest(conversation) if after is not None else None  # new: empty
        rows = await _message_rows(conversation, turn_messages, offset=0, head=head)
        return await _store_turn(conversation, rows, completion_id, model, request_id, on_created)

    # One transaction, shared with the turns stored at the same moment (one commit for all).
    key = str(after.conversation_id) if after is not None else ""  # type: ignore[attr-defined]
    return await together(store, atomic=True, key=key)


async def _touch(conversation: Conversation) -> None:
    conversation.updated_at = timezone.now()
    await raw.update(Conversation, {"updated_at": conversation.updated_at}, id=conversation.id)


def _restates(message: ChatMessage, after: Message) -> bool:
    """`message` only repeats `after`, the turn it continues: its tool calls, as a client
    resends them with their results (OpenWebUI's stateful Responses mode). Stored once."""
    if message.role != "assistant" or not message.tool_calls or not after.tool_calls:
        return False
    ids = [call.id for call in message.tool_calls]
    return ids == [call.get("id") for call in after.tool_calls] and message.text in (
        "",
        after.content or "",
    )


async def _message_rows(
    conversation: Conversation, messages: Sequence[ChatMessage], *, offset: int, head: str | None
) -> list[dict[str, Any]]:
    """The rows that append `messages` to `conversation`, whose stored messages digest to
    `head` (their images are stored here, the rows by the caller)."""
    previous = head
    rows: list[dict[str, Any]] = []
    blobs: dict[str, Blob] = {}
    for index, message in enumerate(messages, start=offset):
        if message.role not in _STORED_ROLES:
            continue
        role = _STORED_ROLES[message.role]
        previous = digest(previous, role, identity(message))
        parts, new_blobs = stored_parts(message, index)
        blobs.update((blob.sha256, blob) for blob in new_blobs)
        rows.append(
            {
                "conversation_id": conversation.id,
                "role": role,
                "content": message.text,
                "parts": parts,
                "tool_calls": tool_calls_json(message),
                "tool_call_id": message.tool_call_id if role == "tool" else None,
                "prefix_hash": previous,
            }
        )
    if blobs:
        found = await Blob.filter(sha256__in=list(blobs)).values_list("sha256", flat=True)
        known = {str(sha) for sha in found}
        new = [blob for sha, blob in blobs.items() if sha not in known]
        await Blob.bulk_create(new, ignore_conflicts=True)  # a concurrent turn may add it
    return rows


async def _store_turn(
    conversation: Conversation,
    rows: list[dict[str, Any]],
    completion_id: str,
    model: str,
    request_id: str,
    on_created: OnCreated | None,
) -> Turn:
    """Store the turn's new `rows` and, after them, its queued assistant row: one INSERT."""
    created = timezone.now()
    rows.append(
        {
            "conversation_id": conversation.id,
            "role": "assistant",
            "status": Status.QUEUED,
            "completion_id": completion_id,
            "model": model,
            "request_id": request_id,
            "created_at": created,
        }
    )
    inserted = await raw.insert(Message, rows, returning=("id", "completion_id"))
    if on_created is not None:
        await on_created(conversation, created)
    return Turn(
        conversation_id=conversation.id,
        completion_id=completion_id,
        model=model,
        created=int(created.timestamp()),
        stored=stored_row(rows[-1], next(id_ for id_, cid in inserted if cid == completion_id)),
    )


def stored_row(row: dict[str, Any], message_id: int) -> dict[str, Any]:
    """The queued assistant `row` just inserted under `message_id`, as a job carries it (JSON)."""
    return {
        "id": message_id,
        "conversation_id": row["conversation_id"],
        "model": row["model"],
        "request_id": row["request_id"],
        "created_at": row["created_at"].isoformat(),
    }


def queued_message(completion_id: str, stored: dict[str, Any]) -> Message:
    """The queued assistant row `stored_row` describes, as reading it back would give it: every
    other column as `raw.insert` filled it."""
    row = {
        **stored,
        "role": "assistant",
        "status": Status.QUEUED.value,
        "completion_id": completion_id,
        "attempt": 0,
    }
    now = timezone.now()  # for no field: the row carries its only date, `created_at`
    return Message._init_from_db(
        **{
            column: raw.filled(Message, row, name, now)
            for name, column in Message._meta.fields_db_projection.items()
        }
    )


async def _fork(parent: Conversation, *, owner: str, upto: int) -> Conversation:
    """A branch holding `parent`'s messages up to the row `upto` (copies: ids stay unique)."""
    branch = await Conversation.create(
        owner=owner, title=parent.title, title_from_task=parent.title_from_task, parent=parent
    )
    rows = await Message.filter(conversation=parent, id__lte=upto).order_by("id")
    copies = []
    for row in rows:
        data = {
            field: getattr(row, field)
            for field in row._meta.db_fields
            if field not in ("id", "conversation_id", "completion_id")
        }
        copies.append(Message(**data, conversation=branch))
    await Message.bulk_create(copies)
    return branch


async def _branch(parent: Conversation, *, owner: str, chat_id: str | None) -> Conversation:
    branch = await Conversation.create(
        owner=owner, title=parent.title, title_from_task=parent.title_from_task, parent=parent
    )
    if chat_id is not None:
        await ChatLink.filter(owner=owner, external_id=chat_id).update(conversation_id=branch.id)
    return branch


async def abandon_turn(turn: Turn, *, reason: dict[str, object]) -> None:
    """Mark a turn that never reached a worker as failed, so nothing is left queued forever."""
    await Message.filter(completion_id=turn.completion_id).update(
        status=Status.FAILED, error=reason
    )
