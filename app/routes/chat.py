"""`POST /v1/chat/completions`: store the turn, hand it to a worker, relay its events."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response
from sanic_ext import openapi
from sanic_ext.extensions.openapi.definitions import Component
from tortoise.queryset import CountQuery

from app import jobs, keys
from app.context import Services, services
from app.db.models import ACTIVE, Message, Status
from app.errors import HaiaError, InvalidRequest, RateLimited, Unavailable
from app.events import Event
from app.generations import (
    abort_job,
    end_as,
    no_worker_error,
    reasoning_of,
    text_of,
    tool_calls_of,
)
from app.inflight import Inflight
from app.logs import request_id_var
from app.openapi import errors, register, stream_events, text
from app.relay import Follower
from app.request_body import parse_body, read_body, release_body
from app.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ToolCall,
    Usage,
)
from app.streaming import (
    StreamTarget,
    ended_in_database,
    failure,
    first_event,
    open_stream,
    relay,
)
from app.tasks import is_task, is_title_prompt, title_from_answer
from app.turns import (
    MAX_CHAT_ID,
    Turn,
    abandon_turn,
    clip_title,
    conversation_for_chat,
    new_completion_id,
    start_turn,
)

bp = Blueprint("chat")
register(ChatCompletionRequest, mode="validation")
register(ChatCompletion)

CONVERSATION_HEADER = "X-Conversation-ID"
CHAT_ID_HEADER = "X-OpenWebUI-Chat-Id"


@bp.post("/v1/chat/completions", stream=True)
@openapi.summary("Create a chat completion (JSON, or SSE chunks with stream: true)")
@openapi.description(
    "Conversation: `X-Conversation-ID`, else `X-OpenWebUI-Chat-Id`, else the stored conversation "
    "whose messages the request resends, else a new one; the response carries its id in "
    "`X-Conversation-ID`. OpenWebUI background tasks (`### Task:`) are answered, not stored."
)
@openapi.body({"application/json": Component(ChatCompletionRequest)}, required=True)
@openapi.parameter(CONVERSATION_HEADER, text(MAX_CHAT_ID), "header")
@openapi.parameter(CHAT_ID_HEADER, text(MAX_CHAT_ID), "header")
@openapi.parameter("X-OpenWebUI-User-Id", text(MAX_CHAT_ID), "header")
@openapi.response(
    200,
    {
        "application/json": Component(ChatCompletion),
        "text/event-stream": stream_events(),
    },
    "The completion (JSON), or its chunks (SSE) with stream: true",
)
@errors(400, 404, 408, 413, 429, 502, 503, 504)
async def create_chat_completion(request: Request) -> HTTPResponse | None:
    svc = services(request)
    await read_body(
        request, within=svc.settings.request_timeout, max_bytes=svc.settings.max_body_bytes
    )
    body = parse_body(request, ChatCompletionRequest)
    if len(body.messages) > svc.settings.max_messages:
        raise InvalidRequest(
            f"A request may carry at most {svc.settings.max_messages} messages "
            "(HAIA_MAX_MESSAGES).",
            param="messages",
        )
    unsupported = body.unsupported_part()
    if unsupported is not None:
        param, kind = unsupported
        raise InvalidRequest(
            f"Content parts of type {kind!r} cannot be sent to a model "
            f"({param}); HAIA passes 'text' and 'image_url' parts.",
            param=param,
        )
    continues = bool(
        request.headers.get(CONVERSATION_HEADER) or request.headers.get(CHAT_ID_HEADER)
    )
    problem = body.tool_result_problem(continues=continues)
    if problem is not None:
        raise InvalidRequest(f"Invalid tool message: {problem[1]}.", param=problem[0])
    if is_task(body):
        return await _answer_task(request, svc, body)
    model = await svc.catalog.resolve(body.model)
    await _admit(svc, request.ctx.owner)
    completion_id = new_completion_id()
    # A stream holds one of the owner's HAIA_MAX_STREAMS_PER_OWNER slots from before its turn
    # is stored (a refusal stores nothing) until it ends.
    slot = svc.streams.hold(request.ctx.owner) if body.stream else contextlib.nullcontext()
    async with slot, svc.relay.follow(completion_id) as follower:
        async with svc.storing:
            turn = await start_turn(
                owner=request.ctx.owner,
                completion_id=completion_id,
                messages=body.messages,
                conversation_id=request.headers.get(CONVERSATION_HEADER) or None,
                chat_id=request.headers.get(CHAT_ID_HEADER) or None,
                model=model,
                request_id=request_id_var.get(),
            )
            await _enqueue(svc, turn, "generate", options=body.options())
        stream, include_usage = body.stream, body.include_usage
        # Stored: the request's copy of the conversation is not needed while the answer streams.
        del body
        release_body(request)
        headers = {CONVERSATION_HEADER: turn.conversation_id}
        if stream:
            await _stream(request, follower, turn, include_usage, headers)
            return None
        completion = await _collect(svc, follower, turn)
        return json_response(completion.model_dump(mode="json"), headers=headers)


def active_generations(owner: str) -> CountQuery:
    """How many of `owner`'s generations are queued or running (found through the index on
    status: every request asks, and they are few among all the ended ones)."""
    return Message.filter(
        role="assistant", status__in=list(ACTIVE), conversation__owner=owner
    ).count()


async def _admit(svc: Services, owner: str) -> None:
    """At most HAIA_MAX_CONCURRENT_PER_OWNER stored generations queued or running per owner
    (0: no limit). Counted from the database, so a crash leaks nothing."""
    limit = svc.settings.max_concurrent_per_owner
    if not limit:
        return
    active = await active_generations(owner)
    if active >= limit:
        raise RateLimited(
            f"You have {active} generations queued or running; HAIA allows {limit} at once "
            "(HAIA_MAX_CONCURRENT_PER_OWNER). Retry when one has finished.",
            retry_after=2,
        )


async def _answer_task(
    request: Request, svc: Services, body: ChatCompletionRequest
) -> HTTPResponse:
    model = svc.settings.task_model or await svc.catalog.resolve(body.model)
    turn = Turn(
        conversation_id="", completion_id=new_completion_id(), model=model, created=int(time.time())
    )
    async with svc.relay.follow(turn.completion_id) as follower:
        await _enqueue(
            svc,
            turn,
            "run_task",
            options=body.options(),
            model_id=model,
            messages=[(m.role, m.text) for m in body.messages],
        )
        completion = await _collect(svc, follower, turn)
    headers = await task_chat(
        request,
        prompt=body.messages[0].text,
        answer=completion.choices[0].message.content or "",
    )
    return json_response(completion.model_dump(mode="json"), headers=headers)


async def task_chat(request: Request, *, prompt: str, answer: str) -> dict[str, str]:
    """A task of a client chat (`X-OpenWebUI-Chat-Id`), on either API: the chat's conversation
    (its header), named by a title task's answer. The title task comes just before the chat's
    first turn: both land in one conversation."""
    chat_id = request.headers.get(CHAT_ID_HEADER) or None
    if chat_id is None:
        return {}
    conversation = await conversation_for_chat(request.ctx.owner, chat_id)
    title = title_from_answer(answer)
    if is_title_prompt(prompt) and title:
        conversation.title, conversation.title_from_task = clip_title(title), True
        await conversation.save(update_fields=["title", "title_from_task", "updated_at"])
    return {CONVERSATION_HEADER: conversation.id}


async def _enqueue(svc: Services, turn: Turn, function: str, **kwargs: Any) -> None:
    try:
        await jobs.enqueue(
            svc.redis,
            function,
            turn.completion_id,
            # a stored turn: visible as waiting until a worker takes it
            inflight=Inflight.queued_entry(
                conversation=turn.conversation_id,
                model=turn.model,
                request_id=request_id_var.get(),
            )
            if turn.conversation_id
            else None,
            request_id=request_id_var.get(),
            **({"stored": turn.stored} if turn.stored is not None else {}),
            **kwargs,
        )
    except Exception as exc:
        error = Unavailable("HAIA cannot reach Redis right now; try again shortly.")
        if turn.conversation_id:
            await abandon_turn(turn, reason=error.body()["error"])
        raise error from exc


async def _await_worker(
    svc: Services, events: AsyncGenerator[Event | None, None], turn: Turn
) -> list[Event]:
    """Wait for a worker to start the job; give up with a 503 after HAIA_QUEUE_TIMEOUT.

    Returns the first event (`start`, or an `end` when it ended before starting).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + svc.settings.queue_timeout
    async for event in events:
        if event is not None:
            return [event]
        if loop.time() < deadline:
            continue
        error = await _queue_timeout_error(svc, turn)
        # Ends it unless a worker took it meanwhile (the fence decides); a task too.
        ended = await end_as(
            svc.redis,
            svc.settings,
            turn.completion_id,
            status=Status.FAILED,
            only_if=frozenset({Status.QUEUED}),
            error=error,
        )
        if ended:
            await abort_job(svc.redis, turn.completion_id)
            await svc.redis.zrem(keys.QUEUE, turn.completion_id)
        deadline = float("inf")  # ended here, or a worker just took it: its events follow
    raise Unavailable("The generation ended without a result.")


async def _queue_timeout_error(svc: Services, turn: Turn) -> HaiaError:
    """The 503 of HAIA_QUEUE_TIMEOUT, saying whether it waited for a worker or for a slot."""
    entry = await Inflight(svc.redis).get(turn.completion_id) or {}
    upstream = svc.settings.upstreams.get(str(entry.get("waiting_for")))
    if upstream is None:
        return no_worker_error(svc.settings)
    return Unavailable(
        f"The request waited more than {svc.settings.queue_timeout:g} s (HAIA_QUEUE_TIMEOUT) "
        f"for one of the {upstream.max_concurrent} slots of upstream {upstream.name!r} "
        f"({upstream.limit_variable}).",
        code="no_worker",
    )


async def _stream(
    request: Request,
    follower: Follower,
    turn: Turn,
    include_usage: bool,
    headers: dict[str, str],
) -> None:
    svc = services(request)
    events = follower.events(ended=ended_in_database(turn.completion_id), fresh=True)
    pending = await _await_worker(svc, events, turn)
    first, model = await first_event(_chain(pending, events), turn.model)
    if first is not None and first.is_terminal and first.status == Status.FAILED:
        raise failure(first)  # nothing sent yet: the client gets the real status
    target = StreamTarget(
        completion_id=turn.completion_id,
        model=model,
        created=turn.created,
        include_usage=include_usage,
    )
    response = await open_stream(request, headers)
    await relay(response, target, events, first=[first], live=follower)


async def _collect(svc: Services, follower: Follower, turn: Turn) -> ChatCompletion:
    deltas: list[Event] = []
    events = follower.events(fresh=True)
    pending = await _await_worker(svc, events, turn)
    model = turn.model
    async for event in _chain(pending, events):
        if event is not None and event.model:
            model = event.model  # a start announcing a (fallback) model, or the end
        if event is None or event.type == "start":
            continue
        if event.type == "delta":
            deltas.append(event)
            continue
        if event.status in (Status.FAILED, Status.INTERRUPTED):
            raise failure(event)
        tool_calls, text = tool_calls_of(deltas), text_of(deltas)
        message = AssistantMessage(
            content=text if text or not tool_calls else None,
            reasoning_content=reasoning_of(deltas) or None,
            tool_calls=[ToolCall.model_validate(call) for call in tool_calls]
            if tool_calls
            else None,
        )
        return ChatCompletion(
            id=turn.completion_id,
            created=turn.created,
            model=model,
            choices=[Choice(message=message, finish_reason=event.finish_reason or "stop")],
            usage=Usage(**event.usage) if event.usage else Usage(),
        )
    raise Unavailable("The generation ended without a result.")


async def _chain(
    first: list[Event], rest: AsyncGenerator[Event | None, None]
) -> AsyncGenerator[Event | None, None]:
    for event in first:
        yield event
    async for later in rest:
        yield later
