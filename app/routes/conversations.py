"""`/v1/conversations`: list, read and delete the caller's stored conversations."""

from __future__ import annotations

from typing import Literal

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response
from sanic_ext import openapi
from tortoise.expressions import Q
from tortoise.functions import Count
from tortoise.queryset import QuerySet, ValuesListQuery

from app import keys
from app.content import data_urls, with_data_urls
from app.context import services
from app.db.models import FINISHED, Conversation, Message
from app.errors import InvalidRequest, NotFound
from app.generations import abort_job
from app.openapi import errors, integer, returns
from app.schemas import (
    ConversationDetail,
    ConversationPage,
    ConversationSummary,
    Deleted,
    ErrorDetail,
    StoredMessage,
    ToolCall,
    Usage,
)
from app.turns import looks_like_conversation_id

bp = Blueprint("conversations")

MAX_LIMIT = 100


def _limit(request: Request) -> int:
    raw = request.args.get("limit", "20")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}.", param="limit")
    return int(raw)


async def _conversation(request: Request, conversation_id: str) -> Conversation:
    found = None
    if looks_like_conversation_id(conversation_id):
        found = await Conversation.get_or_none(id=conversation_id, owner=request.ctx.owner)
    if found is None:
        raise NotFound(f"No conversation {conversation_id!r} exists.", param="conversation_id")
    return found


def conversation_page(owner: str, after: Conversation | None, size: int) -> QuerySet[Conversation]:
    """`size` of `owner`'s conversations, most recently updated first, from after `after`."""
    query = Conversation.filter(owner=owner)
    if after is not None:
        query = query.filter(
            Q(updated_at__lt=after.updated_at)
            | (Q(updated_at=after.updated_at) & Q(id__lt=after.id))
        )
    return query.order_by("-updated_at", "-id").limit(size)


async def _message_counts(conversation_ids: list[str]) -> dict[str, int]:
    """How many messages each of `conversation_ids` holds (through the conversation index)."""
    if not conversation_ids:
        return {}
    found = await message_counts(conversation_ids)
    return {str(conversation_id): int(count) for conversation_id, count in found}


def message_counts(conversation_ids: list[str]) -> ValuesListQuery[Literal[False]]:
    """(conversation id, number of messages) of each of `conversation_ids` that has some."""
    return (
        Message.filter(conversation_id__in=conversation_ids)
        .group_by("conversation_id")
        .annotate(count=Count("id"))
        .values_list("conversation_id", "count")
    )


def _summary(conversation: Conversation, count: int) -> ConversationSummary:
    return ConversationSummary(
        id=conversation.id,
        title=conversation.title,
        message_count=count,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
        parent_id=conversation.parent_id,  # type: ignore[attr-defined]
    )


@bp.get("/v1/conversations")
@openapi.summary("List conversations, most recently updated first")
@openapi.parameter("limit", integer(minimum=1, maximum=MAX_LIMIT), "query")
@openapi.parameter("after", str, "query")
@returns(200, ConversationPage, "A page of conversations")
@errors(400, 404)
async def list_conversations(request: Request) -> HTTPResponse:
    limit = _limit(request)
    after = request.args.get("after")
    cursor = await _conversation(request, after) if after else None
    # The page first (through the owner's index, in order), then the messages of its
    # conversations only: counting in the same query joined every message of every
    # conversation the owner has, for each page (100 ms at 100,000 messages, on the loop).
    rows = await conversation_page(request.ctx.owner, cursor, limit + 1)
    counts = await _message_counts([row.id for row in rows[:limit]])
    page = [_summary(row, counts.get(row.id, 0)) for row in rows[:limit]]
    body = ConversationPage(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(rows) > limit,
    )
    return json_response(body.model_dump(mode="json"))


def _stored(message: Message, blobs: dict[str, str]) -> StoredMessage:
    return StoredMessage(
        id=message.id,
        role=message.role,
        content=with_data_urls(message.parts, blobs) if message.parts else message.content,
        reasoning_content=message.reasoning or None,
        tool_calls=[ToolCall.model_validate(call) for call in message.tool_calls]
        if message.tool_calls
        else None,
        tool_call_id=message.tool_call_id,
        status=message.status.value,
        model=message.model,
        completion_id=message.completion_id,
        finish_reason=message.finish_reason,
        usage=Usage.of(message.prompt_tokens, message.completion_tokens),
        created_at=message.created_at,
        error=ErrorDetail.model_validate(message.error) if message.error else None,
    )


@bp.get("/v1/conversations/<conversation_id:str>")
@openapi.summary("A conversation with its messages")
@returns(200, ConversationDetail, "The conversation")
@errors(404)
async def get_conversation(request: Request, conversation_id: str) -> HTTPResponse:
    conversation = await _conversation(request, conversation_id)
    messages = await Message.filter(conversation=conversation).order_by("id")
    blobs = await data_urls(messages)
    detail = ConversationDetail(
        **_summary(conversation, len(messages)).model_dump(),
        messages=[_stored(message, blobs) for message in messages],
    )
    return json_response(detail.model_dump(mode="json"))


@bp.delete("/v1/conversations/<conversation_id:str>")
@openapi.summary("Delete a conversation, its messages and their replay logs")
@returns(200, Deleted, "Deleted")
@errors(404, 503)
async def delete_conversation(request: Request, conversation_id: str) -> HTTPResponse:
    svc = services(request)
    conversation = await _conversation(request, conversation_id)
    completions = await Message.filter(
        conversation=conversation, completion_id__isnull=False
    ).values_list("completion_id", "status")
    for completion_id, status in completions:
        if status not in FINISHED:  # stop what still runs; nothing of it is kept
            await svc.redis.set(keys.gen_cancel(str(completion_id)), "1", ex=3600)
            await abort_job(svc.redis, str(completion_id))
    if completions:
        await svc.redis.delete(
            *(
                key
                for cid, _ in completions
                for key in (keys.gen_log(str(cid)), keys.gen_fence(str(cid)))
            )
        )
    await conversation.delete()
    return json_response(Deleted(id=conversation_id).model_dump(mode="json"))
