"""The Responses API wire encoder: a generation's events → OpenAI Responses SSE events.

The second encoder of HAIA's one generation core (the first is `app.sse`, chat chunks). It reads
the same events (`app.events`) the worker appends to the replay log, plus the response's
request metadata (`ResponsesRequest.meta`), and produces the Responses events in OpenAI's order:

    response.created [response.queued] response.in_progress
    per item: response.output_item.added, then by kind
      message:   content_part.added, output_text.delta…, output_text.done, content_part.done
      reasoning: content_part.added, reasoning_text.delta…, reasoning_text.done,
                 content_part.done  — or, when the request set `reasoning.summary`, only
                 reasoning_summary_part.added, reasoning_summary_text.delta…, .done,
                 reasoning_summary_part.done
      function:  function_call_arguments.delta…, function_call_arguments.done
    response.output_item.done
    exactly one of response.completed | response.incomplete | (error, response.failed)

Sequence numbers and item ids depend only on the events, so a resumed stream re-encodes from
the first event and sends what comes after the client's `starting_after`. Plain dicts and one
`json.dumps` per event: this runs per token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from app.events import Event

DONE = b"data: [DONE]\n\n"

_KEEP_CODES = frozenset({"context_length_exceeded", "rate_limit_exceeded"})
"""Error codes a `response.failed` carries as they are (clients act on them); others are
`server_error`, with HAIA's own code in the `error` event before it."""


_JSON = json.JSONEncoder(separators=(",", ":"))
"""One encoder for every frame (`json.dumps` with arguments builds a new one per call)."""
_scan_string: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_TEXT_DELTA = 'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'


def frame(event: dict[str, Any]) -> bytes:
    """One SSE frame: `event: <type>` and the JSON; no `id:` line (resume by sequence)."""
    kind: str = event["type"]
    return ("event: " + kind + "\ndata: " + _JSON.encode(event) + "\n\n").encode()


def _usage(usage: dict[str, Any] | None, reasoning_deltas: int) -> dict[str, Any] | None:
    """Responses usage from the `end` event's; reasoning tokens as the upstream reported them,
    else counted from the streamed reasoning deltas."""
    if usage is None:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    details = usage.get("completion_tokens_details")
    reported = details.get("reasoning_tokens") if isinstance(details, dict) else None
    reasoning_tokens = reported if isinstance(reported, int) else reasoning_deltas
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, completion)},
        "total_tokens": prompt + completion,
    }


class ResponseEncoder:
    """Encodes one response's events, in order; `feed` returns the Responses events one
    generation event makes (`sequence_number` set), `response()` the response object now."""

    def __init__(self, meta: dict[str, Any], *, completed_at: int | None = None) -> None:
        self.meta = meta
        self._suffix = str(meta["id"]).removeprefix("resp_")
        self._summary = bool(meta.get("summary"))
        self._namespaces: dict[str, list[str]] = meta.get("namespaces") or {}
        self._completed_at = completed_at
        self.seq = -1
        self.status = "queued" if meta.get("background") else "in_progress"
        self.output: list[dict[str, Any]] = []
        self._texts: dict[int, list[str]] = {}
        self._open: int | None = None  # the open message or reasoning item
        self._calls: dict[int, int] = {}  # tool call index -> output index
        self._open_calls: list[int] = []
        self._reasoning_deltas = 0
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self.ended = False
        self._started = False
        self.model: str = str(meta["model"])
        """The model answering: the request's, until a `start` or the `end` names another."""

    # -- the response object ---------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        meta = self.meta
        conversation = meta.get("conversation_id")
        return {
            "id": meta["id"],
            "object": "response",
            "created_at": meta["created_at"],
            "completed_at": self._completed_at if self.ended else None,
            "status": self.status,
            "background": bool(meta.get("background")),
            "error": self.error,
            "incomplete_details": self.incomplete,
            "instructions": meta.get("instructions"),
            "max_output_tokens": meta.get("max_output_tokens"),
            "max_tool_calls": meta.get("max_tool_calls"),
            "model": self.model,
            "output": [self._final(index) for index in range(len(self.output))],
            "parallel_tool_calls": meta.get("parallel_tool_calls", True),
            "previous_response_id": meta.get("previous_response_id"),
            "reasoning": meta.get("reasoning"),
            "safety_identifier": meta.get("safety_identifier"),
            "prompt_cache_key": meta.get("prompt_cache_key"),
            "service_tier": meta.get("service_tier") or "default",
            "store": bool(meta.get("store", True)),
            "temperature": meta.get("temperature", 1.0),
            "text": meta.get("text") or {"format": {"type": "text"}},
            "tool_choice": meta.get("tool_choice", "auto"),
            "tools": meta.get("tools") or [],
            "top_logprobs": meta.get("top_logprobs", 0),
            "top_p": meta.get("top_p", 1.0),
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "truncation": "disabled",
            "usage": self.usage,
            "user": meta.get("user"),
            "metadata": meta.get("metadata") or {},
            "conversation": {"id": conversation} if conversation else None,
        }

    def _final(self, index: int) -> dict[str, Any]:
        """An output item with its text filled in."""
        item = self.output[index]
        text = "".join(self._texts.get(index, ()))
        kind = item["type"]
        if kind == "message":
            return {
                **item,
                "content": [
                    {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                ],
            }
        if kind == "reasoning":
            if self._summary:
                return {**item, "summary": [{"type": "summary_text", "text": text}]}
            return {**item, "content": [{"type": "reasoning_text", "text": text}]}
        return dict(item)

    # -- events ----------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq, **fields}

    def prelude(self) -> list[dict[str, Any]]:
        """`response.created` (and `response.queued` for a background response): what is
        sent before any worker event."""
        events = [self._event("response.created", response=self.response())]
        if self.meta.get("background"):
            events.append(self._event("response.queued", response=self.response()))
        return events

    def feed(self, event: Event) -> list[dict[str, Any]]:
        if self.ended:
            return []
        if event.type == "delta":
            if event.tool is not None:
                return self._tool(event.tool)
            if event.reasoning:
                return self._delta("reasoning", event.reasoning)
            if event.text:
                return self._delta("message", event.text)
            return []
        if event.type == "start":
            self.model = event.model or self.model
            if self._started:  # a fallback model announcing itself
                return []
            self._started = True
            self.status = "in_progress"
            return [self._event("response.in_progress", response=self.response())]
        return self._end(event)

    def text_frame(self, text: str, after: int, encoded: str | None = None) -> bytes | None:
        """The hot path: a content delta while a message item is open, rendered straight to
        its frame (the same bytes `frame` makes of `feed`'s event); None when `feed` must
        take it (it opens an item). `encoded`: `text` as a JSON string already (the worker's
        `json.dumps`, which `_JSON` would repeat byte for byte)."""
        index = self._open
        if index is None or self.output[index]["type"] != "message":
            return None
        self._texts[index].append(text)
        self.seq += 1
        if self.seq <= after:
            return b""
        return (
            f'{_TEXT_DELTA}"sequence_number":{self.seq},"item_id":"{self.output[index]["id"]}",'
            f'"output_index":{index},"content_index":0,'
            f'"delta":{_JSON.encode(text) if encoded is None else encoded},'
            '"logprobs":[]}\n\n'
        ).encode()

    def _delta(self, kind: str, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        index = self._open
        if index is None or self.output[index]["type"] != kind:
            out.extend(self._close_all("completed"))
            out.extend(self._open_item(kind))
            index = self._open
            assert index is not None
        self._texts[index].append(text)
        item_id = self.output[index]["id"]
        if kind == "message":
            out.append(
                self._event(
                    "response.output_text.delta",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    delta=text,
                    logprobs=[],
                )
            )
            return out
        self._reasoning_deltas += 1
        if self._summary:
            out.append(
                self._event(
                    "response.reasoning_summary_text.delta",
                    item_id=item_id,
                    output_index=index,
                    summary_index=0,
                    delta=text,
                )
            )
        else:
            out.append(
                self._event(
                    "response.reasoning_text.delta",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    delta=text,
                )
            )
        return out

    def _open_item(self, kind: str) -> list[dict[str, Any]]:
        index = len(self.output)
        self._texts[index] = []
        self._open = index
        if kind == "message":
            item: dict[str, Any] = {
                "id": f"msg_{self._suffix}_{index}",
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self.output.append(item)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            return [
                self._event("response.output_item.added", output_index=index, item=dict(item)),
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                ),
            ]
        item = {
            "id": f"rs_{self._suffix}_{index}",
            "type": "reasoning",
            "status": "in_progress",
            "summary": [],
        }
        if not self._summary:
            item["content"] = []
        self.output.append(item)
        added = self._event("response.output_item.added", output_index=index, item=dict(item))
        if self._summary:
            return [
                added,
                self._event(
                    "response.reasoning_summary_part.added",
                    item_id=item["id"],
                    output_index=index,
                    summary_index=0,
                    part={"type": "summary_text", "text": ""},
                ),
            ]
        return [
            added,
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part={"type": "reasoning_text", "text": ""},
            ),
        ]

    def _tool(self, piece: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        call = int(piece.get("index") or 0)
        index = self._calls.get(call)
        if index is None:
            if self._open is not None:
                out.extend(self._close(self._open, "completed"))
            index = len(self.output)
            self._calls[call] = index
            self._open_calls.append(index)
            self._texts[index] = []
            name = str(piece.get("name") or "")
            item: dict[str, Any] = {
                "id": f"fc_{self._suffix}_{index}",
                "type": "function_call",
                "status": "in_progress",
                "call_id": str(piece.get("id") or f"call_{self._suffix}_{index}"),
                "name": name,
                "arguments": "",
            }
            namespace = self._namespaces.get(name)
            if namespace is not None:
                item["namespace"], item["name"] = namespace
            self.output.append(item)
            added = self._event("response.output_item.added", output_index=index, item=dict(item))
            out.append(added)
        arguments = str(piece.get("arguments") or "")
        if arguments:
            self._texts[index].append(arguments)
            if index in self._open_calls:
                out.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=self.output[index]["id"],
                        output_index=index,
                        delta=arguments,
                    )
                )
        return out

    def _close_all(self, status: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._open is not None:
            out.extend(self._close(self._open, status))
        for index in list(self._open_calls):
            out.extend(self._close(index, status))
        return out

    def _close(self, index: int, status: str) -> list[dict[str, Any]]:
        item = self.output[index]
        text = "".join(self._texts.get(index, ()))
        item_id = item["id"]
        out: list[dict[str, Any]] = []
        kind = item["type"]
        if kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out.append(
                self._event(
                    "response.output_text.done",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    text=text,
                    logprobs=[],
                )
            )
            out.append(
                self._event(
                    "response.content_part.done",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        elif kind == "reasoning" and self._summary:
            out.append(
                self._event(
                    "response.reasoning_summary_text.done",
                    item_id=item_id,
                    output_index=index,
                    summary_index=0,
                    text=text,
                )
            )
            out.append(
                self._event(
                    "response.reasoning_summary_part.done",
                    item_id=item_id,
                    output_index=index,
                    summary_index=0,
                    part={"type": "summary_text", "text": text},
                )
            )
        elif kind == "reasoning":
            out.append(
                self._event(
                    "response.reasoning_text.done",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    text=text,
                )
            )
            out.append(
                self._event(
                    "response.content_part.done",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    part={"type": "reasoning_text", "text": text},
                )
            )
        else:
            item["arguments"] = text
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item_id,
                    output_index=index,
                    name=item["name"],
                    arguments=text,
                )
            )
            self._open_calls.remove(index)
        if self._open == index:
            self._open = None
        item["status"] = status
        out.append(
            self._event("response.output_item.done", output_index=index, item=self._final(index))
        )
        return out

    def _end(self, event: Event) -> list[dict[str, Any]]:
        self.ended = True
        self.model = event.model or self.model
        if self._completed_at is None:
            self._completed_at = event.at if event.at is not None else int(time.time())
        self.usage = _usage(event.usage, self._reasoning_deltas)
        status = event.status or "failed"
        if status == "completed" and event.finish_reason == "length":
            self.status = "incomplete"
            self.incomplete = {"reason": "max_output_tokens"}
            out = self._close_all("incomplete")
            return [*out, self._event("response.incomplete", response=self.response())]
        if status == "completed":
            self.status = "completed"
            out = self._close_all("completed")
            return [*out, self._event("response.completed", response=self.response())]
        out = self._close_all("incomplete")
        if status == "cancelled":
            self.status = "cancelled"
            return [*out, self._event("response.incomplete", response=self.response())]
        detail = event.error or {}
        code = str(detail.get("code") or "server_error")
        message = str(detail.get("message") or "The generation failed.")
        self.status = "failed"
        self.error = {"code": code if code in _KEEP_CODES else "server_error", "message": message}
        # The SDK's shape (top-level code/message/param): the `openai` SDK aborts a stream on
        # any event whose data has an `error` key, before `response.failed` could arrive.
        out.append(self._event("error", code=code, message=message, param=detail.get("param")))
        return [*out, self._event("response.failed", response=self.response())]


def encode(meta: dict[str, Any], events: list[Event]) -> list[dict[str, Any]]:
    """Every Responses event a generation's events make, from the first: a pure function of
    them (the stream a client that resumes would have received)."""
    encoder = ResponseEncoder(meta)
    out = encoder.prelude()
    for event in events:
        out.extend(encoder.feed(event))
    return out


class ResponseStream:
    """The encoder as a relay's `app.streaming.Encoder`: the frames with a sequence number
    after `after` (-1: all of them); `data: [DONE]` is the relay's."""

    def __init__(self, meta: dict[str, Any], *, after: int = -1, prelude: bool = True) -> None:
        self.encoder = ResponseEncoder(meta)
        self._after = after
        self._prelude = prelude

    def _frames(self, events: list[dict[str, Any]]) -> bytes:
        after = self._after
        return b"".join(frame(event) for event in events if event["sequence_number"] > after)

    def opening(self) -> bytes:
        return self._frames(self.encoder.prelude()) if self._prelude else b""

    def encode(self, event: Event) -> bytes:
        if event.text and event.type == "delta" and event.tool is None and not event.reasoning:
            fast = self.encoder.text_frame(event.text, self._after)
            if fast is not None:
                return fast
        return self._frames(self.encoder.feed(event))

    def encode_text(self, seq: int, text: bytes) -> bytes | None:
        # The JSON string is kept for the frame; its text, for the response object, is read
        # with the decoder's own string scanner (`json.loads` costs twice that per token).
        encoded = text.decode()
        decoded, end = _scan_string(encoded, 1)
        if end != len(encoded):
            return None  # not one JSON string: the event's slow path decides
        return self.encoder.text_frame(decoded, self._after, encoded) if decoded else None

    def lost(self, detail: dict[str, Any]) -> bytes:
        """Not an encoded event (no sequence number of its own): the stream broke off."""
        return frame(
            {
                "type": "error",
                "sequence_number": max(self.encoder.seq, 0),
                "code": detail.get("code"),
                "message": str(detail.get("message") or "The stream broke off."),
                "param": None,
            }
        )
