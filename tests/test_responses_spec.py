"""The validators of tests/responses_spec.py accept what OpenAI sends and reject what it never
would: each check is shown to fail on a body or stream broken in one place."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.responses_spec import (
    SpecViolation,
    check_event,
    check_input_items,
    check_response,
    check_stream,
)


def response(
    status: str = "completed", output: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A response object as OpenAI returns one, every field the spec requires present."""
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1767225600,
        "completed_at": 1767225601 if status == "completed" else None,
        "status": status,
        "incomplete_details": None,
        "model": "fake-model",
        "previous_response_id": None,
        "instructions": None,
        "output": output or [],
        "error": None,
        "tools": [
            {
                "type": "function",
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                "strict": False,
            }
        ],
        "tool_choice": "auto",
        "truncation": "disabled",
        "parallel_tool_calls": True,
        "text": {"format": {"type": "text"}},
        "top_p": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "top_logprobs": 0,
        "temperature": 1.0,
        "reasoning": {"effort": None, "summary": "auto"},
        "usage": {
            "input_tokens": 10,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": 7,
            "output_tokens_details": {"reasoning_tokens": 2},
            "total_tokens": 17,
        }
        if status == "completed"
        else None,
        "max_output_tokens": None,
        "max_tool_calls": None,
        "store": True,
        "background": False,
        "service_tier": "default",
        "metadata": {},
        "safety_identifier": None,
        "prompt_cache_key": None,
        "haia_extra": "fields the schemas do not know are allowed",
    }


REASONING = {"type": "reasoning", "id": "rs_1", "status": "completed", "summary": []}
SUMMARY = {"type": "summary_text", "text": "thinking"}
MESSAGE = {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant"}
PART = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
CALL = {
    "type": "function_call",
    "id": "fc_1",
    "call_id": "call_1",
    "name": "get_weather",
    "arguments": "",
    "status": "in_progress",
}


def good_events() -> list[dict[str, Any]]:
    """Reasoning (as a summary), a text message and a function call, in OpenAI's order."""
    done_reasoning = {**REASONING, "summary": [SUMMARY]}
    done_message = {**MESSAGE, "status": "completed", "content": [{**PART, "text": "Hi there"}]}
    done_call = {**CALL, "arguments": '{"city": "Paris"}', "status": "completed"}
    item = {"item_id": "rs_1", "output_index": 0}
    text = {"item_id": "msg_1", "output_index": 1, "content_index": 0}
    call = {"item_id": "fc_1", "output_index": 2}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response("in_progress")},
        {"type": "response.in_progress", "response": response("in_progress")},
        {"type": "response.output_item.added", "output_index": 0, "item": REASONING},
        {"type": "response.reasoning_summary_part.added", **item, "summary_index": 0,
         "part": {"type": "summary_text", "text": ""}},
        {"type": "response.reasoning_summary_text.delta", **item, "summary_index": 0,
         "delta": "think"},
        {"type": "response.reasoning_summary_text.delta", **item, "summary_index": 0,
         "delta": "ing"},
        {"type": "response.reasoning_summary_text.done", **item, "summary_index": 0,
         "text": "thinking"},
        {"type": "response.reasoning_summary_part.done", **item, "summary_index": 0,
         "part": SUMMARY},
        {"type": "response.output_item.done", "output_index": 0, "item": done_reasoning},
        {"type": "response.output_item.added", "output_index": 1, "item": {**MESSAGE,
         "content": []}},
        {"type": "response.content_part.added", **text, "part": PART},
        {"type": "response.output_text.delta", **text, "delta": "Hi", "logprobs": []},
        {"type": "response.output_text.delta", **text, "delta": " there", "logprobs": []},
        {"type": "response.output_text.done", **text, "text": "Hi there", "logprobs": []},
        {"type": "response.content_part.done", **text, "part": {**PART, "text": "Hi there"}},
        {"type": "response.output_item.done", "output_index": 1, "item": done_message},
        {"type": "response.output_item.added", "output_index": 2, "item": CALL},
        {"type": "response.function_call_arguments.delta", **call, "delta": '{"city": '},
        {"type": "response.function_call_arguments.delta", **call, "delta": '"Paris"}'},
        {"type": "response.function_call_arguments.done", **call, "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "response.output_item.done", "output_index": 2, "item": done_call},
        {"type": "response.completed",
         "response": response("completed", [done_reasoning, done_message, done_call])},
    ]  # fmt: skip
    return [{**event, "sequence_number": n} for n, event in enumerate(events)]


def sse(events: list[dict[str, Any]], done: bool = True) -> str:
    frames = [f"event: {event['type']}\ndata: {json.dumps(event)}\n\n" for event in events]
    return "".join(frames) + ("data: [DONE]\n\n" if done else "")


# --- response objects -----------------------------------------------------------------------


def test_a_complete_response_object_passes() -> None:
    body = check_response(response("completed", [{**REASONING, "summary": [SUMMARY]}]))
    assert body["haia_extra"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", None),  # required, not nullable
        ("top_p", None),
        ("created_at", "1767225600"),  # strict: no coercion from a string
        ("status", 3),
        ("text", {}),  # text.format is required
        ("usage", {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}),  # no details
        (
            "output",
            [{**MESSAGE, "content": [{"type": "output_text", "text": "x"}]}],
        ),  # no annotations
        ("output", [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]),
        ("output", [{k: v for k, v in REASONING.items() if k != "summary"}]),
    ],
)
def test_a_response_object_missing_what_the_spec_requires_fails(field: str, value: Any) -> None:
    body = response()
    body[field] = value
    with pytest.raises(SpecViolation):
        check_response(body)


@pytest.mark.parametrize("field", ["parallel_tool_calls", "service_tier", "prompt_cache_key"])
def test_a_response_object_without_a_required_field_fails(field: str) -> None:
    body = response()
    del body[field]
    with pytest.raises(SpecViolation):
        check_response(body)


# --- events ---------------------------------------------------------------------------------


def test_every_event_of_a_good_stream_passes_alone() -> None:
    for event in good_events():
        assert check_event(event)["type"] == event["type"]


@pytest.mark.parametrize(
    "event",
    [
        # the SDK requires `logprobs` on text deltas
        {"type": "response.output_text.delta", "sequence_number": 3, "item_id": "m",
         "output_index": 0, "content_index": 0, "delta": "x"},
        # the spec's name for reasoning deltas: the SDK, Codex and OpenWebUI read reasoning_text
        {"type": "response.reasoning.delta", "sequence_number": 3, "item_id": "r",
         "output_index": 0, "content_index": 0, "delta": "x"},
        {"type": "response.reasoning_text.delta", "sequence_number": 3, "item_id": "r",
         "output_index": 0, "delta": "x"},  # no content_index
        {"type": "response.output_text.delta", "item_id": "m", "output_index": 0,
         "content_index": 0, "delta": "x", "logprobs": []},  # no sequence_number
        {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1"}},
        # the spec's shape of `error`, on which the openai SDK raises: HAIA sends the SDK's
        {"type": "error", "sequence_number": 4,
         "error": {"type": "server_error", "code": "x", "message": "boom", "param": None}},
    ],
)  # fmt: skip
def test_a_malformed_event_fails(event: dict[str, Any]) -> None:
    with pytest.raises(SpecViolation):
        check_event(event)


def test_the_openai_named_reasoning_text_events_and_the_sdk_error_event_pass() -> None:
    base = {"item_id": "r", "output_index": 0, "content_index": 0, "sequence_number": 5}
    check_event({"type": "response.reasoning_text.delta", **base, "delta": "x"})
    check_event({"type": "response.reasoning_text.done", **base, "text": "x"})
    error = {"type": "error", "sequence_number": 6, "message": "boom", "param": None}
    check_event({**error, "code": "upstream_error"})


def test_a_json_schema_format_is_judged_by_the_spec_json() -> None:
    """`openresponses-types` types `schema` as null only; the spec says object or null."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    fmt = {"type": "json_schema", "name": "t", "description": None, "strict": True}
    body = response()
    body["text"] = {"format": {**fmt, "schema": schema}}
    assert check_response(body)["text"]["format"]["schema"] == schema  # returned as sent
    for broken in ({**fmt, "schema": "an object"}, {"type": "json_schema", "name": "t",
                   "schema": schema, "strict": True}):  # fmt: skip
        body["text"] = {"format": broken}
        with pytest.raises(SpecViolation):  # not an object; no description (required)
            check_response(body)


def test_failed_responses_carry_an_sdk_error_code_or_a_client_one() -> None:
    body = response("failed")
    for code in ("server_error", "rate_limit_exceeded", "context_length_exceeded"):
        body["error"] = {"code": code, "message": "it failed"}
        check_response(body)
    body["error"] = {"code": "upstream_error", "message": "it failed"}
    with pytest.raises(SpecViolation, match="openai Response"):
        check_response(body)


# --- streams --------------------------------------------------------------------------------


def test_a_good_stream_passes() -> None:
    stream = check_stream(sse(good_events()))
    assert stream.text() == "Hi there"
    assert stream.response["status"] == "completed"
    assert stream.types[-1] == "response.completed"


def test_a_resumed_stream_passes_from_its_resume_point() -> None:
    events = good_events()
    stream = check_stream(sse(events[12:]), starting_after=11)
    assert stream.types[0] == "response.output_text.delta"


def _drop(index: int) -> Callable[[list[dict[str, Any]]], None]:
    def drop(events: list[dict[str, Any]]) -> None:
        del events[index]

    return drop


def _set(index: int, **fields: Any) -> Callable[[list[dict[str, Any]]], None]:
    return lambda events: events[index].update(fields)


BREAKS: dict[str, Callable[[list[dict[str, Any]]], None]] = {
    "gap in sequence numbers": _drop(12),
    "restarted numbering": _set(5, sequence_number=0),
    "no created first": _drop(0),
    "delta before its item": lambda events: events.insert(2, events.pop(11)),
    "done text differs from deltas": _set(13, text="Hi here"),
    "arguments differ from deltas": _set(19, arguments='{"city": "Rome"}'),
    "item never done": _drop(15),
    "final output differs": lambda events: events[-1]["response"]["output"].pop(),
    "two terminals": lambda events: events.insert(-1, copy.deepcopy(events[-1])),
    "terminal status wrong": lambda events: events[-1]["response"].update(status="failed"),
    "other response id": lambda events: events[1]["response"].update(id="resp_2"),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_a_broken_stream_fails(name: str) -> None:
    events = good_events()
    BREAKS[name](events)
    if name != "gap in sequence numbers" and name != "restarted numbering":
        events = [{**event, "sequence_number": n} for n, event in enumerate(events)]
    with pytest.raises(SpecViolation):
        check_stream(sse(events))


def test_a_stream_without_done_or_with_sse_ids_or_wrong_event_names_fails() -> None:
    events = good_events()
    with pytest.raises(SpecViolation, match=r"\[DONE\]"):
        check_stream(sse(events, done=False))
    with pytest.raises(SpecViolation, match="id: line"):
        check_stream(
            sse(events).replace("event: response.created\n", "id: 0\nevent: response.created\n")
        )
    with pytest.raises(SpecViolation, match="event:"):
        check_stream(sse(events).replace("event: response.in_progress", "event: response.created"))


def test_input_item_lists_are_checked() -> None:
    item = {"type": "message", "id": "msg_1", "role": "user", "status": "completed",
            "content": [{"type": "input_text", "text": "hi"}]}  # fmt: skip
    listing = {"object": "list", "data": [item], "first_id": "msg_1", "last_id": "msg_1"}
    assert check_input_items({**listing, "has_more": False})["data"] == [item]
    with pytest.raises(SpecViolation):
        check_input_items(listing)  # has_more is required
