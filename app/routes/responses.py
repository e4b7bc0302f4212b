"""The OpenAI Responses API: `/v1/responses` and a response's routes.

A response is a generation like a chat completion: the same turn storage (`app.turns`), the
same admission, queue, worker, replay log, relay, cancel and lifecycle. Only the wire differs:
requests are translated by `app.responses_schema`, events encoded by `app.responses_wire`.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import datetime
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response
from sanic_ext import openapi
from sanic_ext.extensions.openapi.definitions import Component

from app import keys
from app.context import Services, services
from app.db import raw as sql
from app.db.models import ACTIVE, FINISHED, Conversation, Message, Status
from app.db.models import Response as StoredResponse
from app.errors import InvalidRequest, NotFound, Unavailable
from app.events import Event
from app.generations import RESPONSE_PREFIX, logged_events
from app.logs import request_id_var
from app.openapi import errors, integer, register, response_events, returns
from app.relay import Follower
from app.request_body import parse_body, read_body, release_body
from app.responses_schema import (
    InputItemList,
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
)
from app.responses_wire import ResponseEncoder, ResponseStream
from app.routes.chat import (
    CHAT_ID_HEADER,
    CONVERSATION_HEADER,
    _admit,
    _await_worker,
    _enqueue,
    task_chat,
)
from app.routes.completions import MAX_SEQ, flag, resume_point, stop_generation, stored_events
from app.streaming import failure, open_stream, relay_encoded
from app.turns import Turn, start_chain_turn, start_turn

bp = Blueprint("responses")
register(ResponsesRequest, mode="validation")
register(ResponseObject)

MAX_LIST = 100
OVERFLOW = "context_length_exceeded"
"""Streamed as `response.failed` even before any output: the Codex CLI acts on that code."""


def new_response_id() -> str:
    return f"{RESPONSE_PREFIX}{secrets.token_hex(24)}"


def looks_like_response_id(value: str) -> bool:
    rest = value.removeprefix(RESPONSE_PREFIX)
    return value.startswith(RESPONSE_PREFIX) and 0 < len(rest) <= 58 and rest.isalnum()


def _input_items(body: ResponsesRequest, response_id: str) -> list[dict[str, Any]]:
    """The input items as `input_items` lists them: each with an id, message content as
    parts."""
    items = []
    suffix = response_id.removeprefix(RESPONSE_PREFIX)
    for index, raw in enumerate(body.items()):
        item = dict(raw)
        item.setdefault("type", "message")
        if item["type"] == "message":
            content = item.get("content")
            if isinstance(content, str) or content is None:
                kind = "output_text" if item.get("role") == "assistant" else "input_text"
                part: dict[str, Any] = {"type": kind, "text": content or ""}
                if kind == "output_text":
                    part["annotations"] = []
                item["content"] = [part]
        item["id"] = str(item.get("id") or f"in_{suffix}_{index}")
        item.setdefault("status", "completed")
        items.append(item)
    return items


async def _previous(request: Request, previous_id: str | None) -> Message | None:
    """The assistant row of the caller's stored response `previous_id`, or a 400."""
    if previous_id is None:
        return None
    found = None
    if looks_like_response_id(previous_id):
        found = await StoredResponse.get_or_none(
            id=previous_id, owner=request.ctx.owner, store=True
        )
    message = await Message.get_or_none(completion_id=previous_id) if found else None
    if message is None:
        raise InvalidRequest(
            f"Previous response with id '{previous_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return message


def _check(svc: Services, body: ResponsesRequest) -> None:
    if body.background and not body.store:
        raise InvalidRequest(
            "A background response must be stored: background requires store to be true.",
            param="background",
        )
    items = body.items()
    if len(items) > svc.settings.max_messages:
        raise InvalidRequest(
            f"A request may carry at most {svc.settings.max_messages} input items "
            "(HAIA_MAX_MESSAGES).",
            param="input",
        )
    unsupported = body.unsupported_part()
    if unsupported is not None:
        param, kind = unsupported
        raise InvalidRequest(
            f"Content parts of type {kind!r} cannot be sent to a model ({param}); HAIA passes "
            "'input_text', 'output_text' and 'input_image' parts (image URLs or data URLs).",
            param=param,
        )
    if not body.chat_messages() and not body.previous_response_id:
        raise InvalidRequest("input must hold at least one message.", param="input")


@bp.post("/v1/responses", stream=True)
@openapi.summary("Create a model response (JSON, or Responses SSE events with stream: true)")
@openapi.description(
    "The OpenAI Responses API on every HAIA model. `previous_response_id` continues a stored "
    "chain (a HAIA conversation: `conversation.id`, `X-Conversation-ID`); `store: false` keeps "
    "nothing after the end; `background: true` returns at once with status `queued`. Streamed "
    "events carry `sequence_number` and no SSE ids: resume with "
    "`GET /v1/responses/{id}?stream=true&starting_after=N`."
)
@openapi.body({"application/json": Component(ResponsesRequest)}, required=True)
@openapi.response(
    200,
    {"application/json": Component(ResponseObject), "text/event-stream": response_events()},
    "The response object, or its events (SSE) with stream: true",
)
@errors(400, 404, 408, 413, 429, 502, 503, 504)
async def create_response(request: Request) -> HTTPResponse | None:
    svc = services(request)
    await read_body(
        request, within=svc.settings.request_timeout, max_bytes=svc.settings.max_body_bytes
    )
    body = parse_body(request, ResponsesRequest)
    _check(svc, body)
    messages = body.chat_messages()
    options = body.options()
    after = await _previous(request, body.previous_response_id)
    if body.is_task():
        return await _answer_task(request, svc, body, options)
    model = await svc.catalog.resolve(body.model)
    await _admit(svc, request.ctx.owner)
    response_id = new_response_id()
    meta = body.meta(response_id=response_id, model=model, created_at=int(time.time()))
    record = _recorder(
        response_id=response_id,
        owner=request.ctx.owner,
        meta=meta,
        inputs=_input_items(body, response_id),
        store=body.store,
    )

    # A stream holds one of the owner's HAIA_MAX_STREAMS_PER_OWNER slots, as on chat.
    slot = svc.streams.hold(request.ctx.owner) if body.stream else contextlib.nullcontext()
    async with slot, svc.relay.follow(response_id) as follower:
        async with svc.storing:
            if after is not None or not body.store:
                turn = await start_chain_turn(
                    owner=request.ctx.owner,
                    completion_id=response_id,
                    messages=messages,
                    after=after,
                    model=model,
                    request_id=request_id_var.get(),
                    on_created=record,
                    own=not body.store,  # deleted at its end: never the stored chain's
                )
            else:
                turn = await start_turn(
                    owner=request.ctx.owner,
                    completion_id=response_id,
                    messages=messages,
                    conversation_id=_conversation_param(request, body),
                    chat_id=request.headers.get(CHAT_ID_HEADER) or None,
                    model=model,
                    request_id=request_id_var.get(),
                    on_created=record,
                )
            if not body.store:
                await _remember(svc, request.ctx.owner, meta)
            await _enqueue(svc, turn, "generate", options=options)
        store, stream, background = body.store, body.stream, body.background
        # Stored: the request's copy of the conversation is not needed while the answer streams.
        del body, messages, options, record
        release_body(request)
        headers = {CONVERSATION_HEADER: turn.conversation_id} if store else {}
        if stream:
            await _stream(request, follower, turn, meta, headers)
            return None
        if background:
            return json_response(ResponseEncoder(meta).response(), headers=headers)
        events = await _collect(svc, follower, turn)
        return json_response(_encoded(meta, events).response(), headers=headers)


def _recorder(
    *,
    response_id: str,
    owner: str,
    meta: dict[str, Any],
    inputs: list[dict[str, Any]],
    store: bool,
) -> Callable[[Conversation, datetime], Awaitable[None]]:
    """Stores the response's row once its conversation exists (`on_created` of the turn)."""

    async def record(conversation: Conversation, created: datetime) -> None:
        meta["created_at"] = int(created.timestamp())
        if store:
            meta["conversation_id"] = conversation.id
        row = {
            "id": response_id,
            "owner": owner,
            "conversation_id": conversation.id,
            "meta": meta,
            "input": inputs,
            "store": store,
            "created_at": created,
        }
        await sql.insert(StoredResponse, [row])

    return record


async def _remember(svc: Services, owner: str, meta: dict[str, Any]) -> None:
    """Keep a `store: false` response's metadata in Redis as long as its replay log may live,
    so its events stay resumable after its rows are gone."""
    ttl = svc.settings.job_timeout + svc.settings.replay_ttl
    data = json.dumps({"owner": owner, "meta": meta})
    await svc.redis.set(keys.response_meta(str(meta["id"])), data, ex=ttl)


async def _remembered(svc: Services, owner: str, response_id: str) -> dict[str, Any] | None:
    if not looks_like_response_id(response_id):
        return None
    raw = await svc.redis.get(keys.response_meta(response_id))
    data = json.loads(raw) if raw else None
    if not isinstance(data, dict) or data.get("owner") != owner:
        return None
    meta: dict[str, Any] = data["meta"]
    return meta


def _conversation_param(request: Request, body: ResponsesRequest) -> str | None:
    """`X-Conversation-ID`, else the request's `conversation` (an id or `{"id": …}`)."""
    header = request.headers.get(CONVERSATION_HEADER)
    if header:
        return str(header)
    extra = body.model_extra or {}
    conversation = extra.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    return str(conversation) if isinstance(conversation, str) and conversation else None


def _encoded(meta: dict[str, Any], events: list[Event]) -> ResponseEncoder:
    encoder = ResponseEncoder(meta)
    encoder.prelude()
    for event in events:
        encoder.feed(event)
    return encoder


async def _stream(
    request: Request,
    follower: Follower,
    turn: Turn,
    meta: dict[str, Any],
    headers: dict[str, str],
) -> None:
    """Relay the events as Responses SSE. A foreground response waits for its first event, so
    a failure before any output is an HTTP error; a background one opens at once (queued)."""
    svc = services(request)
    events = follower.events(fresh=True)
    if meta.get("background"):
        response = await open_stream(request, headers)
        await relay_encoded(response, ResponseStream(meta), events, live=follower)
        return
    # Up to the first delta or end (or a silent keep-alive interval): a failure before any
    # output is still an HTTP error.
    buffered: list[Event | None] = list(await _await_worker(svc, events, turn))
    while buffered[-1] is not None and buffered[-1].type == "start":
        buffered.append(await anext(events))
    first = buffered[-1]
    if (
        first is not None
        and first.is_terminal
        and first.status == Status.FAILED
        and (first.error or {}).get("code") != OVERFLOW
    ):
        raise failure(first)  # nothing sent yet: the client gets the real status
    response = await open_stream(request, headers)
    await relay_encoded(response, ResponseStream(meta), events, first=buffered, live=follower)


async def _collect(svc: Services, follower: Follower, turn: Turn) -> list[Event]:
    """Every event up to the end; a failed generation is an HTTP error (nothing was sent)."""
    events = follower.events(fresh=True)
    collected = await _await_worker(svc, events, turn)
    if collected[-1].is_terminal:
        return _checked(collected)
    async for event in events:
        if event is None:
            continue
        collected.append(event)
        if event.is_terminal:
            return _checked(collected)
    raise Unavailable("The generation ended without a result.")


def _checked(events: list[Event]) -> list[Event]:
    end = events[-1]
    if end.status in (Status.FAILED, Status.INTERRUPTED):
        raise failure(end)
    return events


async def _answer_task(
    request: Request, svc: Services, body: ResponsesRequest, options: dict[str, Any]
) -> HTTPResponse:
    """OpenWebUI's `### Task:` requests: answered, not stored (as on chat completions)."""
    model = svc.settings.task_model or await svc.catalog.resolve(body.model)
    response_id = new_response_id()
    turn = Turn(conversation_id="", completion_id=response_id, model=model, created=0)
    messages = [(m.role, m.text) for m in body.chat_messages()]
    instructions = body.instruction_text()
    if instructions:
        messages.insert(0, ("system", instructions))
    meta = body.meta(response_id=response_id, model=model, created_at=int(time.time()))
    meta["store"] = False
    async with svc.relay.follow(response_id) as follower:
        await _enqueue(svc, turn, "run_task", options=options, model_id=model, messages=messages)
        events = await _collect(svc, follower, turn)
    answered = _encoded(meta, events).response()
    answer = "".join(
        str(part.get("text") or "")
        for item in answered["output"]
        if item["type"] == "message"
        for part in item["content"]
    )
    headers = await task_chat(request, prompt=messages[-1][1], answer=answer)
    return json_response(answered, headers=headers)


# -- a response after its request ----------------------------------------------------------


async def _stored(request: Request, response_id: str) -> tuple[StoredResponse, Message]:
    """The caller's response and its assistant row; another owner's is as absent as none."""
    found = None
    if looks_like_response_id(response_id):
        found = await StoredResponse.get_or_none(id=response_id, owner=request.ctx.owner)
    message = await Message.get_or_none(completion_id=response_id) if found else None
    if found is None or message is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return found, message


def _meta(stored: StoredResponse) -> dict[str, Any]:
    return dict(stored.meta)


async def _events(svc: Services, message: Message) -> list[Event]:
    """The generation's events: its replay log, else (expired) what the row stored."""
    events = await logged_events(svc.redis, str(message.completion_id))
    if events or message.status not in FINISHED:
        return events
    stored = [event async for event in stored_events(message) if event is not None]
    return [Event(seq=1, type="start"), *stored]


async def _current(svc: Services, stored: StoredResponse, message: Message) -> dict[str, Any]:
    meta = _meta(stored)
    meta["model"] = message.model or meta["model"]  # the model that answered
    encoder = _encoded(meta, await _events(svc, message))
    body = encoder.response()
    if not encoder.ended:
        body["status"] = "queued" if message.status == Status.QUEUED else "in_progress"
    elif message.finished_at is not None:
        body["completed_at"] = int(message.finished_at.timestamp())
    return body


@bp.get("/v1/responses/<response_id:str>")
@openapi.summary("Retrieve a response; with stream=true, (re)attach to its events")
@openapi.parameter("stream", bool, "query")
@openapi.parameter("starting_after", integer(minimum=0, maximum=MAX_SEQ), "query")
@openapi.parameter("Last-Event-ID", integer(minimum=0, maximum=MAX_SEQ), "header")
@openapi.response(
    200,
    {"application/json": Component(ResponseObject), "text/event-stream": response_events()},
    "The response object (status queued, in_progress, completed, incomplete, failed or "
    "cancelled), or its events after starting_after, live until the end",
)
@errors(400, 404, 429, 503)
async def get_response(request: Request, response_id: str) -> HTTPResponse | None:
    svc = services(request)
    stream = flag(request, "stream")
    after = resume_point(request, default=-1)
    if not stream:
        stored, message = await _stored(request, response_id)
        if not stored.store:
            raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
        return json_response(await _current(svc, stored, message))
    async with svc.streams.hold(request.ctx.owner), svc.relay.follow(response_id) as follower:
        try:  # after subscribing: nothing can slip by
            stored, message = await _stored(request, response_id)
        except NotFound:
            # A `store: false` response that ended: resumable while its replay log lives.
            meta = await _remembered(svc, request.ctx.owner, response_id)
            if meta is None or not await follower.has_log():
                raise
            response = await open_stream(request, {})
            await relay_encoded(response, ResponseStream(meta, after=after), follower.events())
            return None
        headers = {CONVERSATION_HEADER: str(stored.conversation_id)}  # type: ignore[attr-defined]
        if message.status in FINISHED and not await follower.has_log():
            events: AsyncGenerator[Event | None, None] = _replay(message)
        else:
            events = follower.events()
        response = await open_stream(request, headers)
        await relay_encoded(response, ResponseStream(_meta(stored), after=after), events)
    return None


async def _replay(message: Message) -> AsyncGenerator[Event | None, None]:
    yield Event(seq=1, type="start")
    async for event in stored_events(message):
        yield event


@bp.post("/v1/responses/<response_id:str>/cancel")
@openapi.summary("Cancel a response (idempotent): the upstream request stops")
@returns(200, ResponseObject, "The response, as it ended")
@errors(404, 503)
async def cancel_response(request: Request, response_id: str) -> HTTPResponse:
    svc = services(request)
    stored, message = await _stored(request, response_id)
    meta = _meta(stored)
    await stop_generation(svc, message)
    if not stored.store:  # its rows may be gone now: answer from the log
        events = await logged_events(svc.redis, response_id)
        return json_response(_encoded(meta, events).response())
    return json_response(await _current(svc, stored, message))


@bp.delete("/v1/responses/<response_id:str>")
@openapi.summary("Delete a finished response (its turns stay in their conversation)")
@returns(200, ResponseDeleted, "Deleted")
@errors(400, 404, 503)
async def delete_response(request: Request, response_id: str) -> HTTPResponse:
    svc = services(request)
    stored, message = await _stored(request, response_id)
    if message.status in ACTIVE:
        raise InvalidRequest(
            f"Response {response_id!r} is still running; cancel it first.", param="response_id"
        )
    await stored.delete()
    await svc.redis.delete(
        keys.gen_log(response_id), keys.gen_fence(response_id), keys.response_meta(response_id)
    )
    return json_response({"id": response_id, "object": "response", "deleted": True})


@bp.get("/v1/responses/<response_id:str>/input_items")
@openapi.summary("List a response's input items (newest first unless order=asc)")
@openapi.parameter("limit", integer(minimum=1, maximum=MAX_LIST), "query")
@openapi.parameter("order", str, "query")
@openapi.parameter("after", str, "query")
@returns(200, InputItemList, "The input items")
@errors(400, 404)
async def list_input_items(request: Request, response_id: str) -> HTTPResponse:
    stored, _ = await _stored(request, response_id)
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'.", param="order")
    raw_limit = request.args.get("limit", "20")
    if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= MAX_LIST):
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIST}.", param="limit")
    items = list(stored.input)
    if order == "desc":
        items.reverse()
    after = request.args.get("after")
    if after is not None:
        ids = [str(item.get("id")) for item in items]
        if after not in ids:
            raise InvalidRequest(f"No input item {after!r} in this response.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[: int(raw_limit)]
    return json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > len(page),
        }
    )
