"""Strict validation of Responses API bodies and streams against the published schemas.

Two references, both as their publishers ship them:

- the Open Responses specification, as the pydantic models of `openresponses-types`
  (generated from the spec's OpenAPI document): `ResponseResource` for a response object and
  one `*StreamingEvent` model per event type the spec defines;
- the `openai` SDK's own types (`openai.types.responses`): `Response` and the
  `ResponseStreamEvent` union, the normative list of event shapes (DESIGN "The Responses API").
  Events the spec names differently (`response.reasoning_text.*`) or shapes as the SDK cannot
  read (`error`) are checked against these alone (see `SDK_ONLY_EVENTS`).

Both are validated in pydantic's strict mode on the JSON text as it came off the wire (no
coercion: `"1"` is not an int, a missing required field or a null where the schema forbids one
fails); fields the schemas do not know are allowed. On top of the schemas, `check_stream` checks
what a streaming client relies on: `event:` names, consecutive `sequence_number`s, no SSE
`id:` lines, one terminal event then `data: [DONE]`, items opened before their deltas and
closed once, deltas that add up to the `.done` texts and to the terminal response's `output`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, get_args

import openai.types.responses as sdk
import openresponses_types as spec
from pydantic import BaseModel, TypeAdapter, ValidationError

SPEC_EVENTS: dict[str, type[BaseModel]] = {
    "response.created": spec.ResponseCreatedStreamingEvent,
    "response.queued": spec.ResponseQueuedStreamingEvent,
    "response.in_progress": spec.ResponseInProgressStreamingEvent,
    "response.completed": spec.ResponseCompletedStreamingEvent,
    "response.failed": spec.ResponseFailedStreamingEvent,
    "response.incomplete": spec.ResponseIncompleteStreamingEvent,
    "response.output_item.added": spec.ResponseOutputItemAddedStreamingEvent,
    "response.output_item.done": spec.ResponseOutputItemDoneStreamingEvent,
    "response.content_part.added": spec.ResponseContentPartAddedStreamingEvent,
    "response.content_part.done": spec.ResponseContentPartDoneStreamingEvent,
    "response.output_text.delta": spec.ResponseOutputTextDeltaStreamingEvent,
    "response.output_text.done": spec.ResponseOutputTextDoneStreamingEvent,
    "response.output_text.annotation.added": spec.ResponseOutputTextAnnotationAddedStreamingEvent,
    "response.refusal.delta": spec.ResponseRefusalDeltaStreamingEvent,
    "response.refusal.done": spec.ResponseRefusalDoneStreamingEvent,
    "response.function_call_arguments.delta": spec.ResponseFunctionCallArgumentsDeltaStreamingEvent,
    "response.function_call_arguments.done": spec.ResponseFunctionCallArgumentsDoneStreamingEvent,
    "response.reasoning_summary_part.added": spec.ResponseReasoningSummaryPartAddedStreamingEvent,
    "response.reasoning_summary_part.done": spec.ResponseReasoningSummaryPartDoneStreamingEvent,
    "response.reasoning_summary_text.delta": spec.ResponseReasoningSummaryDeltaStreamingEvent,
    "response.reasoning_summary_text.done": spec.ResponseReasoningSummaryDoneStreamingEvent,
}
# Checked against the SDK's types only:
# - `response.reasoning_text.*`: named by OpenAI only (the spec's `response.reasoning.*`, which
#   HAIA does not send: the SDK, the Codex CLI and OpenWebUI read OpenAI's names);
# - `error`: the spec nests its payload under an `error` key, and the `openai` SDK raises on any
#   event whose data has one, before `response.failed` arrives; HAIA sends the SDK's shape
#   (top-level `code`, `message`, `param`), as OpenAI does.
SDK_ONLY_EVENTS = frozenset(
    {"response.reasoning_text.delta", "response.reasoning_text.done", "error"}
)
# Error codes a failed response carries that the SDK's `ResponseError.code` literal does not
# list but clients act on (the Codex CLI: a full context window); anything else must be listed.
CLIENT_ERROR_CODES = frozenset({"context_length_exceeded"})
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
TERMINAL_STATUS = {
    "response.completed": "completed",
    "response.incomplete": "incomplete",
    "response.failed": "failed",
}


def _sdk_events() -> dict[str, type[BaseModel]]:
    """The members of the SDK's `ResponseStreamEvent` union, by their `type` literal."""
    members = get_args(get_args(sdk.ResponseStreamEvent)[0])
    return {get_args(model.model_fields["type"].annotation)[0]: model for model in members}


SDK_EVENTS = _sdk_events()
_SDK_RESPONSE: TypeAdapter[sdk.Response] = TypeAdapter(sdk.Response)
_SPEC_RESPONSE: TypeAdapter[spec.ResponseResource] = TypeAdapter(spec.ResponseResource)


class SpecViolation(AssertionError):
    """A body or stream that the Open Responses spec or the openai SDK's types reject."""


@functools.cache
def _adapter(model: type[BaseModel]) -> TypeAdapter[Any]:
    return TypeAdapter(model)


def _validate(adapter: TypeAdapter[Any], text: str, what: str) -> Any:
    try:
        return adapter.validate_json(text, strict=True)
    except ValidationError as exc:
        raise SpecViolation(f"{what}: {exc}") from None


def _text(data: dict[str, Any] | str) -> str:
    return data if isinstance(data, str) else json.dumps(data)


def check_response(data: dict[str, Any] | str) -> dict[str, Any]:
    """A response object (a body, `GET`, a lifecycle event's `response`), checked; returned
    as a dict."""
    text = _text(data)
    body: dict[str, Any] = json.loads(text)
    _validate(_SPEC_RESPONSE, _spec_view(body, text), "Open Responses ResponseResource")
    _validate(_SDK_RESPONSE, _sdk_view(body, text), "openai Response")
    _check_output_items(body)
    return body


def _spec_view(body: dict[str, Any], text: str) -> str:
    """The body as `openresponses-types` can judge it. Its generated `JsonSchemaResponseFormat`
    types `schema` as `None` only, where the spec's JSON says `object` or `null`: checked here
    against the spec, then nulled for the model (which still checks every other field)."""
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or "schema" not in fmt:
        return text
    if not isinstance(fmt["schema"], dict | None):
        raise SpecViolation(f"text.format.schema must be an object or null: {fmt['schema']!r}")
    return json.dumps({**body, "text": {**body["text"], "format": {**fmt, "schema": None}}})


def _sdk_view(body: dict[str, Any], text: str) -> str:
    """The body as the SDK's types can judge it: an error code of `CLIENT_ERROR_CODES` stands
    in as `server_error` for the SDK's literal."""
    error = body.get("error")
    if isinstance(error, dict) and error.get("code") in CLIENT_ERROR_CODES:
        return json.dumps({**body, "error": {**error, "code": "server_error"}})
    return text


def _check_output_items(body: dict[str, Any]) -> None:
    """What the schemas leave optional but DESIGN requires of every output item."""
    for index, item in enumerate(body["output"]):
        where = f"output[{index}] ({item.get('type')})"
        if not item.get("id") or not item.get("status"):
            raise SpecViolation(f"{where}: an output item needs an id and a status: {item}")
        if item["type"] == "reasoning" and not isinstance(item.get("summary"), list):
            raise SpecViolation(f"{where}: a reasoning item needs a summary list: {item}")


def check_event(data: dict[str, Any] | str) -> dict[str, Any]:
    """One streamed event, checked against the spec's model for its type (where the spec
    defines one) and the SDK's `ResponseStreamEvent`; returned as a dict."""
    text = _text(data)
    event: dict[str, Any] = json.loads(text)
    kind = event.get("type")
    if not isinstance(kind, str) or kind not in SPEC_EVENTS.keys() | SDK_ONLY_EVENTS:
        raise SpecViolation(f"event type {kind!r} is neither an Open Responses nor an openai event")
    if kind in SPEC_EVENTS:
        _validate(_adapter(SPEC_EVENTS[kind]), text, f"Open Responses {SPEC_EVENTS[kind].__name__}")
    _validate(_adapter(SDK_EVENTS[kind]), text, f"openai {SDK_EVENTS[kind].__name__}")
    if "response" in event:
        check_response(event["response"])
    return event


@dataclass
class Frame:
    """One SSE frame as sent: its `event:`, `data:` and `id:` lines."""

    event: str | None = None
    data: str | None = None
    id: str | None = None


def parse_sse(raw: str) -> list[Frame]:
    """The frames of a whole SSE body (comments dropped)."""
    frames = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        frame = Frame()
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        for line in lines:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                frame.data = value if frame.data is None else f"{frame.data}\n{value}"
            elif name in ("event", "id"):
                setattr(frame, name, value)
        if lines:
            frames.append(frame)
    return frames


@dataclass
class _Item:
    output_index: int
    item: dict[str, Any]
    texts: dict[tuple[str, int], str] = field(default_factory=dict)
    done: bool = False


@dataclass
class Stream:
    """A checked stream: its events in order and the terminal event's response."""

    events: list[dict[str, Any]]
    response: dict[str, Any]
    done_items: list[dict[str, Any]]

    @property
    def types(self) -> list[str]:
        return [event["type"] for event in self.events]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == kind]

    def text(self) -> str:
        return "".join(event["delta"] for event in self.of_type("response.output_text.delta"))


_DELTA_KEYS = {
    "response.output_text.delta": ("text", "content_index"),
    "response.reasoning_text.delta": ("reasoning", "content_index"),
    "response.reasoning_summary_text.delta": ("summary", "summary_index"),
    "response.function_call_arguments.delta": ("arguments", None),
}
_DONE_KEYS = {
    "response.output_text.done": ("text", "content_index", "text"),
    "response.reasoning_text.done": ("reasoning", "content_index", "text"),
    "response.reasoning_summary_text.done": ("summary", "summary_index", "text"),
    "response.function_call_arguments.done": ("arguments", None, "arguments"),
}


class _Tracker:
    """The item bookkeeping of `check_stream`."""

    def __init__(self, resumed: bool) -> None:
        self.items: dict[str, _Item] = {}
        self.resumed = resumed
        self.next_index = 0
        self.done_items: list[dict[str, Any]] = []

    def added(self, event: dict[str, Any]) -> None:
        item = event["item"]
        if item["id"] in self.items:
            raise SpecViolation(f"item {item['id']} added twice")
        if not self.resumed and event["output_index"] != self.next_index:
            raise SpecViolation(f"output_index {event['output_index']}, {self.next_index} next")
        self.next_index = event["output_index"] + 1
        self.items[item["id"]] = _Item(event["output_index"], item)

    def open_item(self, event: dict[str, Any]) -> _Item | None:
        """The item an event is about: it must be open (unless added before a resume)."""
        item = self.items.get(event["item_id"] if "item_id" in event else event["item"]["id"])
        if item is None:
            if self.resumed:
                return None
            raise SpecViolation(f"{event['type']} for an item never added: {event}")
        if item.done or item.output_index != event["output_index"]:
            raise SpecViolation(f"{event['type']} for a closed or other item: {event}")
        return item

    def delta(self, event: dict[str, Any]) -> None:
        item = self.open_item(event)
        kind, index = _DELTA_KEYS[event["type"]]
        if item is not None:
            key = (kind, event[index] if index else 0)
            item.texts[key] = item.texts.get(key, "") + event["delta"]

    def text_done(self, event: dict[str, Any]) -> None:
        item = self.open_item(event)
        kind, index, name = _DONE_KEYS[event["type"]]
        if item is not None:
            got = item.texts.get((kind, event[index] if index else 0), "")
            if got != event[name]:
                raise SpecViolation(f"{event['type']}: {event[name]!r} but deltas made {got!r}")

    def item_done(self, event: dict[str, Any]) -> None:
        item = self.open_item(event)
        if item is not None:
            item.done = True
            self._matches_deltas(event["item"], item)
        self.done_items.append(event["item"])

    @staticmethod
    def _matches_deltas(final: dict[str, Any], item: _Item) -> None:
        if final["type"] == "function_call":
            wanted = item.texts.get(("arguments", 0), "")
            if final["arguments"] != wanted:
                raise SpecViolation(f"function_call arguments {final['arguments']!r} != {wanted!r}")
        if final["type"] == "message":
            for i, part in enumerate(final["content"]):
                if part["type"] == "output_text" and part["text"] != item.texts.get(
                    ("text", i), ""
                ):
                    raise SpecViolation(f"message text {part['text']!r} != its deltas")
        if final["type"] == "reasoning":
            for i, part in enumerate(final["summary"]):
                if part["text"] != item.texts.get(("summary", i), ""):
                    raise SpecViolation(f"reasoning summary {part['text']!r} != its deltas")

    def closed(self) -> None:
        still_open = [item_id for item_id, item in self.items.items() if not item.done]
        if still_open:
            raise SpecViolation(f"items never done: {still_open}")


def _check_frames(frames: list[Frame]) -> list[Frame]:
    if not frames or frames[-1].data != "[DONE]":
        raise SpecViolation("the stream does not end with data: [DONE]")
    if sum(1 for frame in frames if frame.data == "[DONE]") != 1:
        raise SpecViolation("data: [DONE] more than once")
    for frame in frames:
        if frame.id is not None:
            raise SpecViolation(f"an SSE id: line ({frame.id}); the spec says not to send them")
    return frames[:-1]


def check_stream(source: str | Iterable[Frame], *, starting_after: int | None = None) -> Stream:
    """A whole SSE body (or its frames), every event and the stream's grammar checked.

    `starting_after` is the resume point of a replayed stream: its numbers start after it and
    its first items may have been opened before it.
    """
    frames = _check_frames(parse_sse(source) if isinstance(source, str) else list(source))
    events: list[dict[str, Any]] = []
    expected = 0 if starting_after is None else starting_after + 1
    tracker = _Tracker(resumed=starting_after is not None)
    for frame in frames:
        if frame.data is None:
            raise SpecViolation(f"a frame without data: {frame}")
        event = check_event(frame.data)
        if frame.event != event["type"]:
            raise SpecViolation(f"event: {frame.event!r} but the data's type is {event['type']!r}")
        if event["sequence_number"] != expected:
            raise SpecViolation(f"sequence_number {event['sequence_number']}, {expected} expected")
        expected += 1
        _track(tracker, event)
        events.append(event)
    if not events:
        raise SpecViolation("no events")
    terminals = [event for event in events if event["type"] in TERMINAL_EVENTS]
    if len(terminals) != 1 or terminals[0] is not events[-1]:
        raise SpecViolation(f"not exactly one terminal event, last: {[e['type'] for e in events]}")
    _check_lifecycle(events, starting_after is None)
    tracker.closed()
    terminal = events[-1]
    response: dict[str, Any] = terminal["response"]
    if response["status"] != TERMINAL_STATUS[terminal["type"]]:
        raise SpecViolation(f"{terminal['type']} with status {response['status']!r}")
    if starting_after is None and response["output"] != tracker.done_items:
        raise SpecViolation("the terminal response's output is not the items streamed")
    return Stream(events, response, tracker.done_items)


def _track(tracker: _Tracker, event: dict[str, Any]) -> None:
    kind = event["type"]
    if kind == "response.output_item.added":
        tracker.added(event)
    elif kind == "response.output_item.done":
        tracker.item_done(event)
    elif kind in _DELTA_KEYS:
        tracker.delta(event)
    elif kind in _DONE_KEYS:
        tracker.text_done(event)
    elif "item_id" in event:
        tracker.open_item(event)


def _check_lifecycle(events: list[dict[str, Any]], from_start: bool) -> None:
    """`response.created` first (then `queued`/`in_progress`), one response id throughout,
    `error` only right before `response.failed`."""
    lifecycle = [event for event in events if "response" in event]
    if from_start:
        if events[0]["type"] != "response.created":
            raise SpecViolation(f"first event {events[0]['type']}, response.created expected")
        if events[1]["type"] not in ("response.in_progress", "response.queued"):
            raise SpecViolation(f"second event {events[1]['type']}")
    ids = {event["response"]["id"] for event in lifecycle}
    if len(ids) != 1:
        raise SpecViolation(f"several response ids in one stream: {ids}")
    for index, event in enumerate(events):
        if event["type"] == "error" and events[index + 1]["type"] != "response.failed":
            raise SpecViolation("an error event not followed by response.failed")


def _sdk_items() -> dict[str, list[type[BaseModel]]]:
    """The members of the SDK's `ResponseItem` union by their `type` literal (a `message` is
    an input or an output message)."""
    found: dict[str, list[type[BaseModel]]] = {}
    for model in get_args(get_args(sdk.ResponseItem)[0]):
        for kind in get_args(model.model_fields["type"].annotation):
            found.setdefault(kind, []).append(model)
    return found


SDK_ITEMS = _sdk_items()


def check_input_items(data: dict[str, Any] | str) -> dict[str, Any]:
    """`GET /v1/responses/{id}/input_items`, checked against the SDK's `ResponseItemList` (the
    spec defines no model of it), each item against the SDK's type of its kind."""
    body: dict[str, Any] = json.loads(_text(data))
    listing = {**body, "data": []}
    _validate(_adapter(sdk.ResponseItemList), json.dumps(listing), "openai ResponseItemList")
    for index, item in enumerate(body["data"]):
        models = SDK_ITEMS.get(item.get("type"), [])
        failures = []
        for model in models:
            try:
                _validate(
                    _adapter(model), json.dumps(item), f"data[{index}]: openai {model.__name__}"
                )
                break
            except SpecViolation as exc:
                failures.append(str(exc))
        else:
            raise SpecViolation("; ".join(failures) or f"data[{index}]: unknown item {item}")
    return body


def output_text(body: dict[str, Any]) -> str:
    """The text of a response's `output_text` parts, in order."""
    return "".join(
        part["text"]
        for item in body["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )
