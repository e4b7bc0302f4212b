"""The Responses encoder's delta templates make exactly the bytes the JSON encoder makes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.responses_wire import frame

TEXTS = [
    "tok0 ",
    "",
    "é à ü",
    "日本語",
    "🙂 emoji",
    'say "hi"',
    "back\\slash",
    "a\nb\tc\r",
    "\x00\x1f",
]
DELTAS: dict[str, dict[str, Any]] = {
    "response.output_text.delta": {"content_index": 0, "logprobs": []},
    "response.reasoning_text.delta": {"content_index": 0},
    "response.reasoning_summary_text.delta": {"summary_index": 0},
    "response.function_call_arguments.delta": {},
}


def generic(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def delta(kind: str, text: str) -> dict[str, Any]:
    event = {"type": kind, "sequence_number": 41, "item_id": "msg_0123abcd_2", "output_index": 2}
    fields = DELTAS[kind]
    if "logprobs" in fields:  # the encoder's order: the delta before logprobs
        return {**event, "content_index": 0, "delta": text, "logprobs": []}
    return {**event, **fields, "delta": text}


@pytest.mark.parametrize("kind", sorted(DELTAS))
@pytest.mark.parametrize("text", TEXTS)
def test_a_delta_frame_is_the_json_encoders_bytes(kind: str, text: str) -> None:
    event = delta(kind, text)
    assert frame(event) == generic(event)
    assert json.loads(frame(event).split(b"data: ", 1)[1]) == event


def test_other_shapes_take_the_general_path() -> None:
    base = delta("response.output_text.delta", "x")
    with_logprobs = {**base, "logprobs": [{"token": "x", "logprob": -0.1, "top_logprobs": []}]}
    extra = {**base, "obfuscation": "pad"}
    reordered = {key: base[key] for key in reversed(list(base))}
    flag = {**base, "output_index": True}  # a bool is an int to Python, not to JSON
    for event in (with_logprobs, extra, reordered, flag):
        assert frame(event) == generic(event)
