"""Events of one generation, as the worker publishes them and the web relays them.

Each event has a sequence number starting at 1; `start` comes first, `end` last. The same
JSON is appended to the replay log and published on the generation's channel.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

EventType = Literal["start", "delta", "end"]


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    type: EventType
    text: str = ""
    status: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        return self.type == "end"

    def to_json(self) -> str:
        if self.type == "delta":  # the hot path: keep it small
            return json.dumps({"seq": self.seq, "type": "delta", "text": self.text})
        data = {key: value for key, value in asdict(self).items() if value or key == "seq"}
        return json.dumps(data)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Event:
        data = json.loads(raw)
        return cls(**data)
