"""Tables. Wire schemas live in `app.schemas`; these are only what is stored."""

from __future__ import annotations

import uuid
from enum import StrEnum

from tortoise import fields
from tortoise.indexes import Index
from tortoise.models import Model


class Status(StrEnum):
    """Where a message's generation stands (user and system turns are `completed`)."""

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


FINISHED = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.INTERRUPTED})
ACTIVE = frozenset({Status.QUEUED, Status.IN_PROGRESS})


def new_conversation_id() -> str:
    return str(uuid.uuid4())


class Conversation(Model):
    """A chat: an ordered list of messages, belonging to one owner.

    An edited or regenerated history never rewrites a conversation: it starts a branch, a new
    conversation whose `parent` is the one it diverged from.
    """

    id = fields.CharField(max_length=64, primary_key=True, default=new_conversation_id)
    owner = fields.CharField(max_length=200, default="", db_index=True)
    title = fields.CharField(max_length=200, default="")
    title_from_task = fields.BooleanField(default=False)
    parent: fields.ForeignKeyNullableRelation[Conversation] = fields.ForeignKeyField(
        "haia.Conversation", related_name="branches", null=True, on_delete=fields.SET_NULL
    )
    created_at = fields.DatetimeField(auto_now_add=True)
    updated_at = fields.DatetimeField(auto_now=True)

    messages: fields.ReverseRelation[Message]

    class Meta:
        table = "haia_conversation"
        # Declared as indexes, not `db_index` on the foreign keys: changing a field makes
        # Tortoise rebuild an SQLite table, and dropping the old one cascades to its children.
        indexes = (
            Index(fields=("parent_id",)),  # a deleted conversation's branches
            Index(fields=("owner", "updated_at", "id")),  # a page of the owner's, newest first
        )


class ChatLink(Model):
    """A client's own chat id (OpenWebUI's `X-OpenWebUI-Chat-Id`) → its current conversation."""

    id = fields.BigIntField(primary_key=True)
    owner = fields.CharField(max_length=200)
    external_id = fields.CharField(max_length=200)
    conversation: fields.ForeignKeyRelation[Conversation] = fields.ForeignKeyField(
        "haia.Conversation", related_name="links", on_delete=fields.CASCADE
    )

    class Meta:
        table = "haia_chat_link"
        indexes = (Index(fields=("conversation_id",)),)  # a deleted conversation's links
        unique_together = (("owner", "external_id"),)


class Message(Model):
    """One turn. Assistant turns carry their completion id, model, usage and timings."""

    id = fields.BigIntField(primary_key=True)
    conversation: fields.ForeignKeyRelation[Conversation] = fields.ForeignKeyField(
        "haia.Conversation", related_name="messages", on_delete=fields.CASCADE
    )
    role = fields.CharField(max_length=16)
    content = fields.TextField(default="")
    status = fields.CharEnumField(Status, max_length=16, default=Status.COMPLETED)
    completion_id = fields.CharField(max_length=64, null=True, unique=True)
    model = fields.CharField(max_length=200, null=True)
    finish_reason = fields.CharField(max_length=32, null=True)
    prompt_tokens = fields.IntField(null=True)
    completion_tokens = fields.IntField(null=True)
    error: dict[str, object] | None = fields.JSONField(null=True)
    request_id = fields.CharField(max_length=128, null=True)
    # A default in the database too: the rows stored before the column existed take it when
    # migration 0002 adds it (and `reasoning` when 0003 does).
    attempt = fields.IntField(default=0, db_default=0)
    """Fencing token: bumped by every run a worker starts; only the current run may end it."""
    parts: list[dict[str, object]] | None = fields.JSONField(null=True)
    """Array content (text and images) as the client sent it, images by `Blob` reference."""
    reasoning = fields.TextField(default="", db_default="")
    """The model's thinking, kept apart from `content` and never sent back as content."""
    reasoning_parts: list[dict[str, object]] | None = fields.JSONField(null=True)
    """Thinking blocks with their provider signatures, sent back as Anthropic requires."""
    tool_calls: list[dict[str, object]] | None = fields.JSONField(null=True)
    """An assistant turn's calls of client tools, in the OpenAI shape."""
    tool_call_id = fields.CharField(max_length=200, null=True)
    """A `tool` turn: the call it answers."""
    prefix_hash = fields.CharField(max_length=64, null=True, db_index=True)
    """Digest of the conversation up to and including this message (finds resent histories)."""
    created_at = fields.DatetimeField(auto_now_add=True)
    started_at = fields.DatetimeField(null=True)
    first_token_at = fields.DatetimeField(null=True)
    finished_at = fields.DatetimeField(null=True)

    class Meta:
        table = "haia_message"
        ordering = ("id",)
        indexes = (
            # A conversation's messages, newest first: every turn's context window and head,
            # the end's previous digest, forks, and the cascade of a deleted conversation.
            # Without it each of those walked the whole table back from the turn's id.
            Index(fields=("conversation_id", "id")),
            # The sweep's rows still queued or in progress (few, among all the ended ones).
            Index(fields=("status", "id")),
        )


class Blob(Model):
    """An image a message carried (a `data:` URL), stored once by content digest: conversations
    resend the same picture every turn, and message rows stay small."""

    sha256 = fields.CharField(max_length=64, primary_key=True)
    media_type = fields.CharField(max_length=100)
    data = fields.BinaryField()
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "haia_blob"


class Response(Model):
    """A Responses API response: its request's metadata and input items. Its generation is the
    assistant `Message` whose `completion_id` is this id, in `conversation` (the chain)."""

    id = fields.CharField(max_length=64, primary_key=True)
    owner = fields.CharField(max_length=200, default="", db_index=True)
    conversation: fields.ForeignKeyRelation[Conversation] = fields.ForeignKeyField(
        "haia.Conversation", related_name="responses", on_delete=fields.CASCADE
    )
    meta: dict[str, object] = fields.JSONField(default=dict)
    """What the response object echoes (instructions, tools, text, reasoning, metadata, …)."""
    input: list[dict[str, object]] = fields.JSONField(default=list)
    """The input items as the client sent them (each with an `id`), for `input_items`."""
    store = fields.BooleanField(default=True)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "haia_response"
        indexes = (Index(fields=("conversation_id",)),)  # a deleted conversation's responses
