"""Events of one generation, as the worker publishes them and the web relays them.

Each event has a sequence number starting at 1; `start` comes first, `end` last. The same
JSON is appended to the replay log and published on the generation's channel. Sequence numbers
are assigned by Redis when the event is appended (see `app.publish`), so the JSON a producer
hands over is the body without `seq`, which Redis prefixes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Literal

EventType = Literal["start", "delta", "end"]

_OPTIONAL = (
    "status",
    "model",
    "finish_reason",
    "usage",
    "error",
    "http_status",
    "retry_after",
    "at",
)


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    type: EventType
    text: str = ""
    """A content delta."""
    reasoning: str = ""
    """A reasoning ("thinking") delta."""
    tool: dict[str, Any] | None = None
    """A piece of a tool call: `index`, and `id`/`name` on its first piece, `arguments`."""
    status: str | None = None
    model: str | None = None
    """On `start`: the model about to answer (a fallback announces itself with another
    `start` before its first delta); on `end`: the model that answered."""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    """`prompt_tokens`, `completion_tokens`, `total_tokens`, and `completion_tokens_details`
    (`reasoning_tokens`) when the upstream reported it."""
    error: dict[str, Any] | None = None
    http_status: int | None = None
    """For a failed `end`: the HTTP status a client that has not started reading gets."""
    retry_after: float | None = None
    at: int | None = None
    """On `end`: when the generation ended (Unix seconds), the same instant the row stores,
    so every encoding of the end (live, resumed, retrieved) names one time."""

    @property
    def is_terminal(self) -> bool:
        return self.type == "end"

    def body(self) -> str:
        """The JSON without `seq`, starting with `{`: what `app.publish` appends."""
        if self.type == "delta" and self.tool is None and not self.reasoning:
            return text_delta_body(self.text)
        data: dict[str, Any] = {"type": self.type}
        if self.text:
            data["text"] = self.text
        if self.reasoning:
            data["reasoning"] = self.reasoning
        if self.tool is not None:
            data["tool"] = self.tool
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return json.dumps(data)

    def to_json(self) -> str:
        return '{"seq": ' + str(self.seq) + ", " + self.body()[1:]

    @classmethod
    def from_json(cls, raw: str | bytes) -> Event:
        data = json.loads(raw)
        known = {key: value for key, value in data.items() if key in _FIELDS}
        return cls(**known)


_FIELDS = frozenset(field.name for field in fields(Event))


def text_delta_body(text: str) -> str:
    """`Event(seq=0, type="delta", text=text).body()` without building the event (the hot
    path: every token; `plain_delta` reads this shape back)."""
    return '{"type": "delta", "text": ' + json.dumps(text) + "}"


_SEQ = b'{"seq": '
_PLAIN_DELTA = b', "type": "delta", "text": '


def plain_delta(raw: bytes) -> tuple[int, bytes] | None:
    """The seq and the text (still a JSON string) of a plain text delta's JSON as Redis holds
    it (`{"seq": N, ` then `Event.body`'s hot path); None for any other event.

    The relay splices the JSON string straight into the client's frame: both sides encode
    text with `json.dumps`'s defaults, so the bytes are those of decoding and encoding again.
    Another field after `text` (a reasoning delta's) shows as `", "`, which cannot occur
    inside the string itself: a quote in it is escaped, and the second quote would follow a
    space, not a backslash.
    """
    comma = raw.find(b",", 8, 30)
    if comma < 0 or not raw.startswith(_PLAIN_DELTA, comma) or not raw.startswith(_SEQ):
        return None
    text = raw[comma + len(_PLAIN_DELTA) : -1]
    if not raw.endswith(b'"}') or b'", "' in text or not text.startswith(b'"'):
        return None
    return int(raw[8:comma]), text


def answering_model(events: list[Event]) -> str | None:
    """The model a log says answered: the `end`'s, else the last `start`'s."""
    return next((event.model for event in reversed(events) if event.model), None)
