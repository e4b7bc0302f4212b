"""What the model sees: the stored conversation turned into pydantic-ai messages.

Text, images (stored blobs or URLs), the assistant's tool calls and the client's tool results
go back in order. Reasoning is never sent back as content; Anthropic's signed thinking blocks
go back with their assistant turn to an Anthropic model, as its tool loop requires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.content import BLOB_SCHEME, data_url, with_data_urls
from app.db import raw
from app.db.models import Blob, Message, Status
from app.prompts import HOMELAB_ASSISTANT_PROMPT


@dataclass(slots=True)
class ContextRow:
    """What a model request is built from, of one stored message: its columns as the ORM
    converts them, without an ORM instance. Building one per message (its dates parsed, its
    fields set one by one) was a sixth of the worker's CPU with 20-message conversations."""

    id: int
    role: str
    content: str
    parts: list[dict[str, object]] | None
    reasoning_parts: list[dict[str, object]] | None
    tool_calls: list[dict[str, object]] | None
    tool_call_id: str | None
    prefix_hash: str | None


_COLUMNS = tuple(ContextRow.__slots__)
_JSON = frozenset({"parts", "reasoning_parts", "tool_calls"})


async def _rows(build: Callable[[raw.Statement], str]) -> list[ContextRow]:
    fields = Message._meta.fields_map
    convert = [fields[name].to_python_value if name in _JSON else None for name in _COLUMNS]
    return [
        ContextRow(
            *(value if to is None else to(value) for to, value in zip(convert, row, strict=True))
        )
        for row in await raw.values(Message, build)
    ]


@dataclass
class Context:
    """The stored messages a turn's model request carries, and the images they reference."""

    rows: list[ContextRow]
    blobs: dict[str, Blob]
    instructions: str | None = HOMELAB_ASSISTANT_PROMPT
    """What the last request carries as instructions: HAIA's homelab prompt for a chat
    completion; the request's own `instructions` (or nothing) for a Responses API turn."""
    whole: bool = False
    """A Responses API turn: the rows in their order, the instructions first."""

    def model_messages(self, kind: str) -> list[Any]:
        """As pydantic-ai messages for an upstream of `kind`, the last request carrying the
        instructions."""
        from workers.pydantic_model import model_messages  # only for pydantic-ai models

        return model_messages(
            self.rows, blobs=self.blobs, provider=kind, instructions=self.instructions
        )

    def openai_messages(self) -> list[dict[str, Any]]:
        """In the OpenAI Chat Completions shape, HAIA's instructions after the system
        messages (a Responses API turn: its instructions first, then every row in order)."""
        if self.whole:
            head = [{"role": "system", "content": self.instructions}] if self.instructions else []
            return [*head, *(_openai_message(row, self.blobs) for row in self.rows)]
        system = [row for row in self.rows if row.role == "system"]
        rest = [row for row in self.rows if row.role != "system"]
        return [
            *({"role": "system", "content": row.content} for row in system),
            {"role": "system", "content": HOMELAB_ASSISTANT_PROMPT},
            *(_openai_message(row, self.blobs) for row in rest),
        ]


async def load_context(
    assistant: Message, *, limit: int, responses: dict[str, Any] | None = None
) -> Context:
    """The last `limit` messages before the new turn, and that turn (a user message, or tool
    results); system messages count inside that budget. With `responses` (a Responses API
    turn), the whole conversation instead (see `_whole`).

    The conversation's latest system message is always sent: when it is older than the window,
    it takes the window's oldest place (so the budget holds), and older system messages are
    left out like any other old message. HAIA's own instructions are not stored and not
    counted. Failed or empty assistant turns are left out: the model should not see them. A
    window that would start with tool results whose call it cut off starts after them instead.
    """
    if responses is not None:
        return await _whole(assistant, responses)
    found = await _rows(lambda s: _window_sql(s, assistant, limit))
    by_id = {row.id: row for row in found}  # the latest system message may be in both halves
    ordered = [by_id[key] for key in sorted(by_id)]
    window, older = ordered[-(limit + 1) :], ordered[: -(limit + 1)]
    system = [row for row in window if row.role == "system"]
    rows = [row for row in window if row.role != "system"]
    if not system and older:  # the latest system message, older than the window
        system = [older[-1]]
        if len(rows) > 1 and len(rows) + 1 > limit + 1:
            rows.pop(0)
    while rows and rows[0].role == "tool":
        rows.pop(0)
    if not rows or rows[-1].role not in ("user", "tool"):
        raise LookupError(f"no user turn precedes {assistant.completion_id}")
    blobs = await _blobs([*system, *rows])
    return Context(rows=[*system, *rows], blobs=blobs)


def _seen(s: raw.Statement, assistant: Message) -> str:
    """The messages before `assistant` in its conversation that the model should see: not
    failed or empty assistant turns."""
    return (
        f"conversation_id = {s.field('conversation_id', assistant.conversation_id)}"  # type: ignore[attr-defined]
        f" AND id < {s.field('id', assistant.id)}"
        f" AND NOT (role = 'assistant' AND ((content = '' AND tool_calls IS NULL)"
        f" OR status = {s.field('status', Status.FAILED)}))"
    )


def _window_sql(s: raw.Statement, assistant: Message, limit: int) -> str:
    """One statement for the window (the last `limit + 1` messages) and the latest system
    message, which may be older."""
    table, columns = raw.table(Message), _columns(s)
    window = (
        f"SELECT {columns} FROM {table} WHERE {_seen(s, assistant)}"
        f" ORDER BY id DESC LIMIT {limit + 1:d}"
    )
    system = (
        f"SELECT {columns} FROM {table} WHERE {_seen(s, assistant)} AND role = 'system'"
        " ORDER BY id DESC LIMIT 1"
    )
    return f"SELECT * FROM ({window}) AS w UNION ALL SELECT * FROM ({system}) AS s"


def _whole_sql(s: raw.Statement, assistant: Message) -> str:
    """Every message before `assistant` that the model should see, in order."""
    return f"SELECT {_columns(s)} FROM {raw.table(Message)} WHERE {_seen(s, assistant)} ORDER BY id"


def _columns(s: raw.Statement) -> str:
    return ", ".join(s.column(name) for name in _COLUMNS)


async def _whole(assistant: Message, responses: dict[str, Any]) -> Context:
    """A Responses API turn: the whole chain in order (`truncation: disabled`), with the
    request's instructions and never HAIA's homelab prompt."""
    rows = await _rows(lambda s: _whole_sql(s, assistant))
    if not rows:
        raise LookupError(f"no input precedes {assistant.completion_id}")
    return Context(
        rows=rows,
        blobs=await _blobs(rows),
        instructions=responses.get("instructions") or None,
        whole=True,
    )


async def _blobs(rows: Sequence[ContextRow]) -> dict[str, Blob]:
    wanted = {
        str(part["image_url"]["url"]).removeprefix(BLOB_SCHEME)  # type: ignore[index]
        for row in rows
        for part in row.parts or ()
        if part.get("type") == "image_url" and str(part["image_url"]["url"]).startswith(BLOB_SCHEME)  # type: ignore[index]
    }
    if not wanted:
        return {}
    return {blob.sha256: blob for blob in await Blob.filter(sha256__in=list(wanted))}


def _openai_message(row: ContextRow, blobs: dict[str, Blob]) -> dict[str, Any]:
    if row.role == "tool":
        return {"role": "tool", "tool_call_id": row.tool_call_id or "", "content": row.content}
    if row.role == "assistant":
        message: dict[str, Any] = {"role": "assistant", "content": row.content or None}
        if row.tool_calls:
            message["tool_calls"] = row.tool_calls
        return message
    if not row.parts:
        return {"role": row.role, "content": row.content}
    return {"role": row.role, "content": with_data_urls(row.parts, _data_urls(blobs))}


def _data_urls(blobs: dict[str, Blob]) -> dict[str, str]:
    return {sha: data_url(blob) for sha, blob in blobs.items()}
