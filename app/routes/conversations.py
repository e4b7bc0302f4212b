"""`/v1/conversations`: list, read and delete the caller's stored conversations."""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response
from sanic_ext import openapi
from tortoise.expressions import Q
from tortoise.functions import Count

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
    query = Conversation.filter(owner=request.ctx.owner)
    after = request.args.get("after")
    if after:
        cursor = await _conversation(request, after)
        query = query.filter(
            Q(updated_at__lt=cursor.updated_at)
            | (Q(updated_at=cursor.updated_at) & Q(id__lt=cursor.id))
        )
    rows = (
        await query.annotate(message_count=Count("messages"))
        .order_by("-updated_at", "-id")
        .limit(limit + 1)
    )
    page = [_summary(row, row.message_count) for row in rows[:limit]]  # type: ignore[attr-defined]
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
