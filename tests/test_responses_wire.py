"""The Responses encoder alone: a pure function of a generation's events, every event of the
SDK's types, resumable at any sequence number."""

from __future__ import annotations

from typing import Any

from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from app.events import Event, plain_delta
from app.responses_schema import ResponsesRequest
from app.responses_wire import ResponseStream, encode, frame

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def meta(**request: Any) -> dict[str, Any]:
    body = ResponsesRequest.model_validate({"input": "hi", **request})
    data = body.meta(response_id="resp_abc", model="ollama:m", created_at=1)
    data["conversation_id"] = "conv-1"
    return data


def log(*events: Event) -> list[Event]:
    numbered = [Event(seq=1, type="start")]
    for seq, event in enumerate(events, start=2):
        numbered.append(Event(**{**_fields(event), "seq": seq}))
    return numbered


def _fields(event: Event) -> dict[str, Any]:
    return {name: getattr(event, name) for name in Event.__dataclass_fields__}


def delta(text: str = "", reasoning: str = "", tool: dict[str, Any] | None = None) -> Event:
    return Event(seq=0, type="delta", text=text, reasoning=reasoning, tool=tool)


def end(status: str = "completed", **extra: Any) -> Event:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    return Event(seq=0, type="end", status=status, usage=usage, **extra)


def test_every_event_is_an_sdk_event_in_order_and_the_final_response_is_whole() -> None:
    events = encode(
        meta(),
        log(
            delta(reasoning="a "),
            delta(reasoning="b"),
            delta(text="x "),
            delta(text="y"),
            delta(tool={"index": 0, "id": "call_1", "name": "f", "arguments": '{"a"'}),
            delta(tool={"index": 1, "id": "call_2", "name": "g", "arguments": "{}"}),
            delta(tool={"index": 0, "arguments": ": 1}"}),
            end(finish_reason="tool_calls"),
        ),
    )
    for event in events:
        EVENTS.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]
    assert final["type"] == "response.completed"
    response = Response.model_validate(final["response"])
    reasoning, message, first, second = response.output
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "a b"
    assert message.type == "message" and message.content[0].text == "x y"  # type: ignore[union-attr]
    assert first.type == "function_call" and first.arguments == '{"a": 1}'
    assert second.type == "function_call" and second.call_id == "call_2"
    # Interleaved argument pieces still reach their own item.
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert [d["output_index"] for d in deltas] == [2, 3, 2]


def test_resuming_at_any_point_gives_the_rest_exactly() -> None:
    data = meta(reasoning={"summary": "auto"})
    generation = log(delta(reasoning="r"), delta(text="t1"), delta(text="t2"), end())
    whole = b"".join(frame(e) for e in encode(data, generation))
    for after in range(-1, len(encode(data, generation))):
        stream = ResponseStream(data, after=after)
        got = stream.opening() + b"".join(stream.encode(e) for e in generation)
        assert whole.endswith(got)
        assert got.count(b"\nevent: ") + got.startswith(b"event: ") == max(
            0, len(encode(data, generation)) - after - 1
        )


def test_summary_mode_sends_thinking_only_as_summary_events() -> None:
    events = encode(meta(reasoning={"summary": "auto"}), log(delta(reasoning="r"), end()))
    kinds = [e["type"] for e in events]
    assert "response.reasoning_summary_text.delta" in kinds
    assert not any(k.startswith("response.reasoning_text") for k in kinds)
    assert events[-1]["response"]["output"][0]["summary"] == [{"type": "summary_text", "text": "r"}]


def test_namespace_calls_come_back_under_the_declared_names() -> None:
    tools = [
        {
            "type": "namespace",
            "name": "crm",
            "description": "d",
            "tools": [{"type": "function", "name": "lookup"}],
        }
    ]
    events = encode(
        meta(tools=tools),
        log(delta(tool={"index": 0, "id": "c", "name": "crm__lookup", "arguments": "{}"}), end()),
    )
    call = events[-1]["response"]["output"][0]
    assert (call["namespace"], call["name"]) == ("crm", "lookup")
    # The response echoes its tools as declared, as the calls come back.
    [tool] = events[-1]["response"]["tools"]
    assert (tool["namespace"], tool["name"]) == ("crm", "lookup")


def test_endings() -> None:
    incomplete = encode(
        meta(max_output_tokens=4), log(delta(text="x"), end(finish_reason="length"))
    )
    assert incomplete[-1]["type"] == "response.incomplete"
    assert incomplete[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    error = {"message": "boom", "type": "server_error", "param": None, "code": "upstream_error"}
    failed = encode(meta(), log(delta(text="x"), end("failed", error=error)))
    assert [e["type"] for e in failed[-2:]] == ["error", "response.failed"]
    assert failed[-1]["response"]["error"] == {"code": "server_error", "message": "boom"}
    for event in failed:
        EVENTS.validate_python(event)
    queued = encode(meta(background=True), [])
    assert [e["type"] for e in queued] == ["response.created", "response.queued"]
    assert queued[0]["response"]["status"] == "queued"


def test_the_text_fast_path_sends_the_bytes_the_events_make() -> None:
    data = meta()
    generation = log(delta(text="a"), delta(text='"quoted" \u00e9'), delta(text="c"), end())
    stream = ResponseStream(data)
    got = stream.opening() + b"".join(stream.encode(e) for e in generation)
    assert got == b"".join(frame(e) for e in encode(data, generation))


SPLICED = ["tok ", 'a", "b', "\\", 'x\\", "y', "é😀\n\t", "\u2028", '{"seq": 1}', "\x00"]


def test_a_spliced_text_delta_is_the_frame_decoding_makes() -> None:
    """The relay hands the text still as the worker's JSON string (`plain_delta`); the frame
    copies it and the response object gets the decoded text: the same bytes and the same
    response as decoding the whole event first."""
    spliced, decoded = ResponseStream(meta()), ResponseStream(meta())
    opening = Event(seq=2, type="delta", text="open ")  # opens the message item
    assert spliced.encode(opening) == decoded.encode(opening)
    for seq, text in enumerate(SPLICED, start=3):
        raw = Event(seq=seq, type="delta", text=text).to_json().encode()
        found = plain_delta(raw)
        assert found is not None
        assert spliced.encode_text(*found) == decoded.encode(Event.from_json(raw))
    ending = end()
    assert spliced.encode(ending) == decoded.encode(ending)
    assert spliced.encoder.response() == decoded.encoder.response()


def test_a_splice_that_is_not_one_json_string_takes_the_slow_path() -> None:
    stream = ResponseStream(meta())
    stream.encode(Event(seq=2, type="delta", text="open "))
    assert stream.encode_text(3, b'"a" "b"') is None
