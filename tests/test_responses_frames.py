"""The Responses encoder's text-delta template makes exactly the bytes the JSON encoder makes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.responses_wire import frame

DELTAS = [
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


def generic(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def delta(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "response.output_text.delta",
        "sequence_number": 41,
        "item_id": "msg_0123abcd_2",
        "output_index": 2,
        "content_index": 0,
        "delta": text,
        "logprobs": [],
        **extra,
    }


@pytest.mark.parametrize("text", DELTAS)
def test_a_text_delta_frame_is_the_json_encoders_bytes(text: str) -> None:
    event = delta(text)
    assert frame(event) == generic(event)
    assert json.loads(frame(event).split(b"data: ", 1)[1]) == event


def test_other_shapes_take_the_general_path() -> None:
    with_logprobs = delta("x")
    with_logprobs["logprobs"] = [{"token": "x", "logprob": -0.1, "top_logprobs": []}]
    extra = delta("x", obfuscation="pad")
    reordered = {key: delta("x")[key] for key in reversed(list(delta("x")))}
    for event in (with_logprobs, extra, reordered):
        assert frame(event) == generic(event)
