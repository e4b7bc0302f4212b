"""A completion after its request: retrieve it, (re)attach to its stream, cancel it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response
from sanic_ext import openapi
from tortoise.exceptions import DoesNotExist

from app import keys
from app.context import Services, services
from app.db.models import FINISHED, Message, Status
from app.errors import InvalidRequest, NotFound
from app.events import Event, answering_model
from app.generations import (
    Ending,
    abort_job,
    end_as,
    logged_events,
    reasoning_of,
    text_of,
    tool_calls_of,
)
from app.openapi import errors, integer, returns, stream_events
from app.schemas import (
    AssistantMessage,
    Choice,
    ErrorDetail,
    StoredCompletion,
    Timings,
    ToolCall,
    Usage,
)
from app.streaming import StreamTarget, ended_in_database, open_stream, relay
from app.turns import looks_like_completion_id

bp = Blueprint("completions")

CANCEL_WAIT = 10.0
MAX_SEQ = 2**31 - 1


async def _message(request: Request, completion_id: str) -> Message:
    """The caller's completion; another owner's is as absent as a missing one."""
    message = None
    if looks_like_completion_id(completion_id):
        message = await Message.get_or_none(
            completion_id=completion_id, role="assistant", conversation__owner=request.ctx.owner
        )
    if message is None:
        raise NotFound(f"No chat completion {completion_id!r} exists.", param="completion_id")
    return message


async def stored_completion(svc: Services, message: Message) -> StoredCompletion:
    """The completion as stored; while it runs, the text so far comes from its replay log, and
    once the log announced its end (the row is written right after), the outcome too."""
    text, status, finish_reason = message.content, message.status, message.finish_reason
    reasoning, tool_calls = message.reasoning, message.tool_calls
    usage = Usage.of(message.prompt_tokens, message.completion_tokens)
    error, model = message.error, message.model or ""
    if message.status not in FINISHED:
        events = await logged_events(svc.redis, str(message.completion_id))
        text, reasoning, tool_calls = text_of(events), reasoning_of(events), tool_calls_of(events)
        model = answering_model(events) or model
        if events and events[-1].is_terminal:
            ending = Ending.from_log(events)
            status, finish_reason, error = ending.status, ending.finish_reason, ending.detail()
            usage = Usage.of(ending.prompt_tokens, ending.completion_tokens)
    return StoredCompletion(
        id=str(message.completion_id),
        created=int(message.created_at.timestamp()),
        model=model,
        status=status.value,
        conversation_id=message.conversation_id,  # type: ignore[attr-defined]
        choices=[
            Choice(
                message=AssistantMessage(
                    content=text if text or not tool_calls else None,
                    reasoning_content=reasoning or None,
                    tool_calls=[ToolCall.model_validate(c) for c in tool_calls]
                    if tool_calls
                    else None,
                ),
                finish_reason=finish_reason,
            )
        ],
        usage=usage,
        timings=Timings(
            created_at=message.created_at,
            started_at=message.started_at,
            first_token_at=message.first_token_at,
            finished_at=message.finished_at,
        ),
        error=ErrorDetail.model_validate(error) if error else None,
    )


@bp.get("/v1/chat/completions/<completion_id:str>")
@openapi.summary("Retrieve a stored chat completion and its status")
@returns(200, StoredCompletion, "The completion")
@errors(404)
async def get_completion(request: Request, completion_id: str) -> HTTPResponse:
    svc = services(request)
    completion = await stored_completion(svc, await _message(request, completion_id))
    return json_response(completion.model_dump(mode="json"))


def flag(request: Request, name: str) -> bool:
    """A `true`/`false` (or `1`/`0`) query parameter; absent is false."""
    raw = request.args.get(name)
    if raw is None:
        return False
    if raw.lower() not in ("true", "false", "1", "0"):
        raise InvalidRequest(f"{name} must be true or false.", param=name)
    return raw.lower() in ("true", "1")


def resume_point(request: Request, *, default: int = 0) -> int:
    """`?starting_after=N`, else `Last-Event-ID: N`, else `default`; each must be a whole
    number (ASCII digits: `²` passes `isdigit()` and fails `int()`)."""
    given = {
        "starting_after": request.args.get("starting_after"),
        "Last-Event-ID": request.headers.get("Last-Event-ID"),
    }
    for name, raw in given.items():
        if raw is not None and not (
            raw.strip().isascii() and raw.strip().isdigit() and int(raw) <= MAX_SEQ
        ):
            raise InvalidRequest(f"{name} must be an integer from 0 to {MAX_SEQ}.", param=name)
    chosen = given["starting_after"] or given["Last-Event-ID"]
    return int(chosen.strip()) if chosen is not None else default


@bp.get("/v1/chat/completions/<completion_id:str>/stream")
@openapi.summary(
    "Attach to a generation's SSE stream (resume with Last-Event-ID or starting_after)"
)
@openapi.parameter("starting_after", integer(minimum=0, maximum=MAX_SEQ), "query")
@openapi.parameter("Last-Event-ID", integer(minimum=0, maximum=MAX_SEQ), "header")
@openapi.parameter("include_usage", bool, "query")
@openapi.response(200, {"text/event-stream": stream_events()}, "SSE chunks, then [DONE]")
@errors(400, 404, 429, 503)
async def stream_completion(request: Request, completion_id: str) -> None:
    svc = services(request)
    after = resume_point(request)
    async with svc.streams.hold(request.ctx.owner), svc.relay.follow(completion_id) as follower:
        message = await _message(request, completion_id)  # after subscribing: nothing can slip by
        model = message.model or ""
        if message.status not in FINISHED:  # a fallback may be answering
            model = answering_model(await logged_events(svc.redis, completion_id)) or model
        target = StreamTarget(
            completion_id=completion_id,
            model=model,
            created=int(message.created_at.timestamp()),
            include_usage=flag(request, "include_usage"),
        )
        headers = {"X-Conversation-ID": str(message.conversation_id)}  # type: ignore[attr-defined]
        if message.status in FINISHED and not await follower.has_log():
            response = await open_stream(request, headers)
            await relay(response, target, stored_events(message, after), send_role=after == 0)
            return
        response = await open_stream(request, headers)
        events = follower.events(after=after, ended=ended_in_database(completion_id))
        await relay(response, target, events, send_role=after == 0)


async def stored_events(message: Message, after: int = 0) -> AsyncGenerator[Event | None, None]:
    """A finished generation whose replay log expired: what it stored, one delta per kind."""
    replay: list[Event] = []
    if message.reasoning:
        replay.append(Event(seq=0, type="delta", reasoning=message.reasoning))
    if message.content:
        replay.append(Event(seq=0, type="delta", text=message.content))
    for index, call in enumerate(message.tool_calls or ()):
        function: dict[str, Any] = call["function"]  # type: ignore[assignment]
        piece = {"index": index, "id": call["id"], "name": function["name"]}
        replay.append(
            Event(seq=0, type="delta", tool={**piece, **{"arguments": function["arguments"]}})
        )
    for seq, event in enumerate(replay, start=2):
        if seq > after:
            yield replace(event, seq=seq)
    usage = Usage.of(message.prompt_tokens, message.completion_tokens)
    yield Event(
        seq=len(replay) + 2,
        type="end",
        status=message.status.value,
        finish_reason=message.finish_reason,
        usage=usage.model_dump() if usage else None,
        error=message.error,
        at=int(message.finished_at.timestamp()) if message.finished_at else None,
    )


@bp.post("/v1/chat/completions/<completion_id:str>/cancel")
@openapi.summary("Cancel a generation (idempotent); returns the stored completion")
@returns(200, StoredCompletion, "The completion, as it ended")
@errors(404, 503)
async def cancel_completion(request: Request, completion_id: str) -> HTTPResponse:
    svc = services(request)
    message = await _message(request, completion_id)
    await stop_generation(svc, message)
    completion = await stored_completion(svc, message)
    return json_response(completion.model_dump(mode="json"))


async def stop_generation(svc: Services, message: Message) -> None:
    """Cancel the generation of `message` unless it has ended (idempotent); waits (up to
    CANCEL_WAIT) for its end, then refreshes the row."""
    if message.status in FINISHED:
        return
    completion_id = str(message.completion_id)
    async with svc.relay.follow(completion_id) as follower:
        await svc.redis.set(keys.gen_cancel(completion_id), "1", ex=svc.settings.job_timeout)
        # Not started yet: end it here. Running (or starting right now): abort the job; the
        # worker stores the partial text. The fence decides which of the two ends it.
        await end_as(
            svc.redis,
            svc.settings,
            completion_id,
            status=Status.CANCELLED,
            only_if=frozenset({Status.QUEUED}),
        )
        await abort_job(svc.redis, completion_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT):
                async for event in follower.events():
                    if event is not None and event.is_terminal:
                        break
    with contextlib.suppress(DoesNotExist):  # a `store: false` response is gone once ended
        await message.refresh_from_db()
