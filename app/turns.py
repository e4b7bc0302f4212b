"""Storing a chat turn: the conversation, the user's message and a pending assistant message."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from tortoise.transactions import in_transaction

from app.db.models import Conversation, Message, Status
from app.errors import NotFound
from app.schemas import ChatMessage

_STORED_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}
TITLE_LENGTH = 80


def new_completion_id() -> str:
    return f"chatcmpl-{secrets.token_urlsafe(18)}"


@dataclass(frozen=True)
class Turn:
    conversation_id: str
    completion_id: str
    model: str
    created: int


def _title(messages: list[ChatMessage]) -> str:
    for message in messages:
        if message.role == "user" and message.text.strip():
            text = " ".join(message.text.split())
            return text if len(text) <= TITLE_LENGTH else text[: TITLE_LENGTH - 1] + "…"
    return ""


async def start_turn(
    *,
    completion_id: str,
    messages: list[ChatMessage],
    conversation_id: str | None,
    model: str,
    request_id: str,
) -> Turn:
    """Store the user's turn and a queued assistant turn, in one transaction.

    A new conversation takes every message the client sent (its history and the new turn);
    an existing one takes only the new turn, since its history is already stored.
    """
    async with in_transaction():
        if conversation_id is None:
            conversation = await Conversation.create(title=_title(messages))
            incoming = messages
        else:
            found = await Conversation.get_or_none(id=conversation_id)
            if found is None:
                raise NotFound(
                    f"No conversation {conversation_id!r} exists.", param="X-Conversation-ID"
                )
            conversation = found
            incoming = messages[-1:]
            await conversation.save(update_fields=["updated_at"])
        await Message.bulk_create(
            [
                Message(conversation=conversation, role=_STORED_ROLES[m.role], content=m.text)
                for m in incoming
                if m.role in _STORED_ROLES
            ]
        )
        assistant = await Message.create(
            conversation=conversation,
            role="assistant",
            status=Status.QUEUED,
            completion_id=completion_id,
            model=model,
            request_id=request_id,
        )
    return Turn(
        conversation_id=conversation.id,
        completion_id=completion_id,
        model=model,
        created=int(assistant.created_at.timestamp()),
    )


async def abandon_turn(turn: Turn, *, reason: dict[str, object]) -> None:
    """Mark a turn that never reached a worker as failed, so nothing is left queued forever."""
    await Message.filter(completion_id=turn.completion_id).update(
        status=Status.FAILED, error=reason
    )
