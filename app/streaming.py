"""Relaying a generation to one client as OpenAI SSE chunks."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol, cast

from sanic import Request
from sanic.response import HTTPResponse

from app.db.models import FINISHED, Message, Status
from app.errors import HaiaError, RelayedError
from app.events import Event
from app.relay import EndCheck, Follower
from app.schemas import Usage
from app.sse import DONE, PING, ChunkWriter

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class StreamTarget:
    completion_id: str
    model: str
    created: int
    include_usage: bool

    def writer(self) -> ChunkWriter:
        return ChunkWriter(
            completion_id=self.completion_id,
            created=self.created,
            model=self.model,
            include_usage=self.include_usage,
        )


def ended_in_database(completion_id: str) -> EndCheck:
    """A follower's check that the generation is over: its stored row says it ended."""

    async def check(last: int) -> Event | None:
        try:
            message = await Message.get_or_none(completion_id=completion_id, role="assistant")
        except Exception as exc:  # noqa: BLE001 - the database away: ask again later
            log.debug("stream end check failed (%s)", type(exc).__name__)
            return None
        if message is None or message.status not in FINISHED:
            return None
        log.warning("generation %s ended but its stream had no end; ending it", completion_id)
        usage = Usage.of(message.prompt_tokens, message.completion_tokens)
        return Event(
            seq=last + 1,
            type="end",
            status=message.status.value,
            finish_reason=message.finish_reason,
            usage=usage.model_dump() if usage else None,
            error=message.error,
        )

    return check


def failure(event: Event) -> HaiaError:
    """The error a failed `end` event carries, with the HTTP status the worker chose."""
    return RelayedError(
        event.error or {"message": "The generation failed.", "type": "api_error"},
        status=event.http_status or 500,
        retry_after=event.retry_after,
    )


async def first_event(
    events: AsyncGenerator[Event | None, None], model: str
) -> tuple[Event | None, str]:
    """The first delta or end event (None once a keep-alive interval passes in silence), and
    the model the `start` events before it announced (else `model`)."""
    async for event in events:
        if event is None or event.type != "start":
            return event, (event.model if event and event.model else model)
        model = event.model or model
    return None, model


async def open_stream(request: Request, headers: dict[str, str]) -> HTTPResponse:
    """Send the SSE response headers; the returned response takes the body piece by piece."""
    response = await request.respond(
        content_type="text/event-stream; charset=utf-8", headers={**headers, **SSE_HEADERS}
    )
    return cast(HTTPResponse, response)


class Encoder(Protocol):
    """One wire format of a generation's events (chat chunks, Responses events)."""

    def opening(self) -> bytes:
        """What goes out before the first event (may be empty)."""
        ...

    def encode(self, event: Event) -> bytes:
        """The frames one event makes (may be empty)."""
        ...

    def lost(self, detail: dict[str, Any]) -> bytes:
        """The frame saying the stream broke off (Redis lost) while the generation goes on."""
        ...

    def encode_text(self, seq: int, text: bytes) -> bytes | None:
        """The frames of a plain text delta whose text is still a JSON string (the hot path:
        no decoding, see `app.events.plain_delta`); None when `encode` must take it."""
        ...


class ChatEncoder:
    """`chat.completion.chunk` frames, each with `id: <seq>`.

    The role chunk goes out with the first delta or end (pings may come before it): until
    then a fallback model may still announce itself, and every chunk names the one that
    answers.
    """

    def __init__(self, target: StreamTarget, *, send_role: bool = True) -> None:
        self._writer = target.writer()
        self._role_pending = send_role

    def opening(self) -> bytes:
        return b""

    def encode(self, event: Event) -> bytes:
        if event.type == "start":
            if event.model and self._role_pending:
                self._writer = self._writer.for_model(event.model)
            return b""
        writer = self._writer
        role = b""
        if self._role_pending:
            self._role_pending = False
            role = writer.role()
        if event.type == "delta":
            if event.tool is not None:
                return role + writer.tool(event.tool, event.seq)
            if event.reasoning:
                return role + writer.reasoning(event.reasoning, event.seq)
            return role + writer.content(event.text, event.seq)
        if event.status == Status.FAILED or event.status == Status.INTERRUPTED:
            return role + writer.error(event.error or {}, event.seq)
        return (
            role
            + writer.finish(event.finish_reason or "stop", event.seq)
            + writer.usage(event.usage, event.seq)
        )

    def lost(self, detail: dict[str, Any]) -> bytes:
        return self._writer.error(detail, None)

    def encode_text(self, seq: int, text: bytes) -> bytes | None:
        if self._role_pending:
            return None
        return self._writer.content_json(text, seq)


async def relay(
    response: HTTPResponse,
    target: StreamTarget,
    events: AsyncGenerator[Event | None, None],
    *,
    first: list[Event | None] | None = None,
    send_role: bool = True,
    live: Follower | None = None,
) -> None:
    """Send `first` then `events` as chunks until the end event, then `data: [DONE]`."""
    encoder = ChatEncoder(target, send_role=send_role)
    await relay_encoded(response, encoder, events, first=first, live=live)


async def relay_encoded(
    response: HTTPResponse,
    encoder: Encoder,
    events: AsyncGenerator[Event | None, None],
    *,
    first: list[Event | None] | None = None,
    live: Follower | None = None,
) -> None:
    """Send `first` then `events` through `encoder` until the end event, then
    `data: [DONE]`; a keep-alive comment for every silent interval.

    `live`: the follower `events` come from; its live events may then be written to the
    client as they arrive (`DirectWrite`), the rest still coming through `events`."""
    opening = encoder.opening()
    if opening:
        await response.send(opening)
    if live is not None:
        live.direct = DirectWrite(response, encoder)
    try:
        for event in first or []:
            if await _send(response, encoder, event):
                return
        async for event in events:
            if await _send(response, encoder, event):
                return
    except HaiaError as exc:
        # Lost Redis mid-stream: say so and end cleanly; the generation goes on in the
        # worker, and the client can re-attach once HAIA is back.
        await response.send(encoder.lost(exc.body()["error"]))
    finally:
        if live is not None:
            live.direct = None
    # Also when resumed past the end: the client already had every event.
    await response.send(DONE, end_stream=True)


class DirectWrite:
    """Writes a live event's frames to the client's socket from the caller, at once.

    Sanic sends a chunk through three coroutines (response, HTTP/1.1 framing, protocol); a
    follower calls this from the pub/sub reader instead, so a token costs no task switch and
    no await. It does what they do, with the same guards: only once the response is streaming
    with chunked framing, only while the socket takes data without waiting (an empty write
    buffer, writing not paused), and it refreshes the protocol's last-activity time as its
    `send` does. When any guard fails it returns False and the stream's task sends the event
    the usual way.
    """

    def __init__(self, response: HTTPResponse, encoder: Encoder) -> None:
        self._http: Any = response.stream
        self._encoder = encoder

    def __call__(self, event: Event) -> bool:
        protocol = self._writable()
        if protocol is None:
            return False
        self._write(protocol, self._encoder.encode(event))
        return True

    def text(self, seq: int, text: bytes) -> bool:
        """Send a plain text delta whose text is still a JSON string (`encode_text`)."""
        protocol = self._writable()
        if protocol is None:
            return False
        data = self._encoder.encode_text(seq, text)
        if data is None:
            return False
        self._write(protocol, data)
        return True

    def _writable(self) -> Any:
        http = self._http
        if http is None or http.response_func != http.http1_response_chunked:
            return None
        protocol = http.protocol
        transport = protocol.transport
        if (
            transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or not protocol._can_write.is_set()
        ):
            return None
        return protocol

    @staticmethod
    def _write(protocol: Any, data: bytes) -> None:
        if data:
            protocol.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            protocol._time = time.monotonic()


async def _send(response: HTTPResponse, encoder: Encoder, event: Event | None) -> bool:
    """Send one event's frames; True once the stream is over."""
    if event is None:
        await response.send(PING)
        return False
    data = encoder.encode(event)
    if not event.is_terminal:
        if data:
            await response.send(data)
        return False
    # The end, `[DONE]` and the chunked body's end: one write, where three were.
    await response.send(data + DONE, end_stream=True)
    return True
