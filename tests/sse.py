"""Reading SSE streams byte-for-byte, as a client without an SDK would."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Frame:
    id: str | None
    data: str | None
    comment: bool = False
    event: str | None = None

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


async def frames(response: httpx.Response) -> AsyncIterator[Frame]:
    """Frames as they arrive; comments (`: ping`) are frames too."""
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            event_id, data, comment, event = None, None, False, None
            for line in block.split("\n"):
                if line.startswith(":"):
                    comment = True
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    data = line[6:] if data is None else f"{data}\n{line[6:]}"
            yield Frame(event_id, data, comment, event)


async def read_all(response: httpx.Response) -> list[Frame]:
    return [frame async for frame in frames(response)]


def content_of(chunks: list[Frame]) -> str:
    text = ""
    for frame in chunks:
        if frame.data and frame.data != "[DONE]":
            for choice in frame.json().get("choices", []):
                text += choice["delta"].get("content") or ""
    return text
