"""OpenAI-style SSE chunks for one completion, built without per-token model validation."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"


class ChunkWriter:
    """Renders `chat.completion.chunk` frames; the header of every chunk is built once."""

    def __init__(self, *, completion_id: str, created: int, model: str, include_usage: bool):
        # Content chunks are the same bytes whoever reads them (the first client or a resume);
        # the usage chunk, when asked for, comes last with `choices: []`.
        self._include_usage = include_usage
        self._id, self._created = completion_id, created
        self._head = (
            f'{{"id":{json.dumps(completion_id)},"object":"chat.completion.chunk",'
            f'"created":{created},"model":{json.dumps(model)},"system_fingerprint":null,'
            f'"choices":'
        )
        self._head_bytes = self._head.encode()

    def for_model(self, model: str) -> ChunkWriter:
        """The same writer naming another model (a fallback that answers instead)."""
        return ChunkWriter(
            completion_id=self._id,
            created=self._created,
            model=model,
            include_usage=self._include_usage,
        )

    def _frame(self, choices: str, seq: int | None) -> bytes:
        event_id = f"id: {seq}\n" if seq is not None else ""
        return f"{event_id}data: {self._head}{choices}}}\n\n".encode()

    def role(self, seq: int | None = 1) -> bytes:
        """The first chunk; it stands for the generation's `start` event (seq 1)."""
        return self._frame(
            '[{"index":0,"delta":{"role":"assistant","content":""},'
            '"logprobs":null,"finish_reason":null}]',
            seq,
        )

    def content(self, text: str, seq: int) -> bytes:
        return self._frame(
            f'[{{"index":0,"delta":{{"content":{json.dumps(text)}}},'
            f'"logprobs":null,"finish_reason":null}}]',
            seq,
        )

    def content_json(self, text: bytes, seq: int) -> bytes:
        """`content` of a text already encoded as a JSON string (by `json.dumps`)."""
        return b'id: %d\ndata: %b[{"index":0,"delta":{"content":%b},%b' % (
            seq,
            self._head_bytes,
            text,
            b'"logprobs":null,"finish_reason":null}]}\n\n',
        )

    def reasoning(self, text: str, seq: int) -> bytes:
        return self._frame(
            f'[{{"index":0,"delta":{{"reasoning_content":{json.dumps(text)}}},'
            f'"logprobs":null,"finish_reason":null}}]',
            seq,
        )

    def tool(self, piece: dict[str, Any], seq: int) -> bytes:
        """A piece of a tool call: id, type and name with its first piece, then arguments."""
        call: dict[str, Any] = {"index": piece["index"]}
        if piece.get("id") or piece.get("name"):
            call.update(id=piece.get("id"), type="function")
            function = {"name": piece.get("name"), "arguments": piece.get("arguments") or ""}
        else:
            function = {"arguments": piece.get("arguments") or ""}
        call["function"] = function
        delta = json.dumps({"tool_calls": [call]}, separators=(",", ":"))
        return self._frame(
            f'[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":null}}]', seq
        )

    def finish(self, reason: str, seq: int) -> bytes:
        return self._frame(
            f'[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":{json.dumps(reason)}}}]',
            seq,
        )

    def usage(self, usage: dict[str, int] | None, seq: int) -> bytes:
        """OpenAI's last chunk with `stream_options.include_usage`: `choices: []`. It carries
        the `end` event's id, like the finish chunk before it."""
        if not self._include_usage:
            return b""
        body = usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        usage_json = json.dumps(body, separators=(",", ":"))
        return f'id: {seq}\ndata: {self._head}[],"usage":{usage_json}}}\n\n'.encode()

    @staticmethod
    def error(detail: dict[str, Any], seq: int | None) -> bytes:
        event_id = f"id: {seq}\n" if seq is not None else ""
        return f"{event_id}data: {json.dumps({'error': detail})}\n\n".encode()
