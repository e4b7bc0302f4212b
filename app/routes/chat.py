"""`POST /v1/chat/completions`: store the turn, hand it to a worker, relay its events."""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response
from sanic_ext import openapi

from app import keys
from app.context import Services, services
from app.db.models import Status
from app.errors import Unavailable
from app.logs import request_id_var
from app.relay import Follower
from app.request_body import parse_body
from app.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ErrorResponse,
    Usage,
)
from app.streaming import StreamTarget, failure, first_event, open_stream, relay
from app.turns import Turn, abandon_turn, new_completion_id, start_turn

bp = Blueprint("chat")

CONVERSATION_HEADER = "X-Conversation-ID"


@bp.post("/v1/chat/completions")
@openapi.summary("Create a chat completion (JSON, or SSE chunks with stream: true)")
@openapi.body({"application/json": ChatCompletionRequest})
@openapi.response(200, {"application/json": ChatCompletion}, "The completion")
@openapi.response(400, {"application/json": ErrorResponse}, "Invalid request")
@openapi.response(404, {"application/json": ErrorResponse}, "Unknown model or conversation")
@openapi.response(503, {"application/json": ErrorResponse}, "A dependency is unavailable")
async def create_chat_completion(request: Request) -> HTTPResponse | None:
    svc = services(request)
    body = parse_body(request, ChatCompletionRequest)
    model = await svc.catalog.resolve(body.model)
    completion_id = new_completion_id()
    async with svc.relay.follow(completion_id) as follower:
        turn = await start_turn(
            completion_id=completion_id,
            messages=body.messages,
            conversation_id=request.headers.get(CONVERSATION_HEADER) or None,
            model=model,
            request_id=request_id_var.get(),
        )
        await _enqueue(svc, turn, body)
        headers = {CONVERSATION_HEADER: turn.conversation_id}
        if body.stream:
            await _stream(request, follower, turn, body.include_usage, headers)
            return None
        return await _collect(follower, turn, headers)


async def _enqueue(svc: Services, turn: Turn, body: ChatCompletionRequest) -> None:
    try:
        await svc.redis.enqueue_job(
            "generate",
            turn.completion_id,
            sampling=body.sampling(),
            request_id=request_id_var.get(),
            _job_id=turn.completion_id,
        )
        await svc.redis.publish(keys.WAKE_CHANNEL, turn.completion_id)
    except Exception as exc:
        error = Unavailable("HAIA cannot reach Redis right now; try again shortly.")
        await abandon_turn(turn, reason=error.body()["error"])
        raise error from exc


async def _stream(
    request: Request,
    follower: Follower,
    turn: Turn,
    include_usage: bool,
    headers: dict[str, str],
) -> None:
    events = follower.events()
    first = await first_event(events)
    if first is not None and first.is_terminal and first.status == Status.FAILED:
        raise failure(first)  # nothing sent yet: the client gets the real status
    target = StreamTarget(
        completion_id=turn.completion_id,
        model=turn.model,
        created=turn.created,
        include_usage=include_usage,
    )
    response = await open_stream(request, headers)
    await relay(response, target, events, first=[first])


async def _collect(follower: Follower, turn: Turn, headers: dict[str, str]) -> HTTPResponse:
    parts: list[str] = []
    async for event in follower.events():
        if event is None or event.type == "start":
            continue
        if event.type == "delta":
            parts.append(event.text)
            continue
        if event.status in (Status.FAILED, Status.INTERRUPTED):
            raise failure(event)
        completion = ChatCompletion(
            id=turn.completion_id,
            created=turn.created,
            model=turn.model,
            choices=[
                Choice(
                    message=AssistantMessage(content="".join(parts)),
                    finish_reason=event.finish_reason or "stop",
                )
            ],
            usage=Usage(**event.usage) if event.usage else Usage(),
        )
        return json_response(completion.model_dump(mode="json"), headers=headers)
    raise Unavailable("The generation ended without a result.")
