"""The arq job for client background tasks (OpenWebUI's titles, tags, follow-ups).

They are answered like any generation, events and all, but are not conversation turns: nothing
of them is stored in the database.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from app.errors import HaiaError
from app.events import Event
from app.generations import ttls
from app.logs import request_id_var
from app.publish import Publisher, claim
from workers.generate import stream_model
from workers.state import state

log = logging.getLogger(__name__)


@dataclass
class TaskPrompt:
    """A task's messages as the client sent them; tasks bring their own instructions."""

    messages: list[tuple[str, str]]

    def model_messages(self) -> list[Any]:
        from workers.pydantic_model import plain_messages  # only for pydantic-ai models

        return plain_messages(self.messages)

    def openai_messages(self) -> list[dict[str, Any]]:
        return [{"role": role, "content": text} for role, text in self.messages]


async def run_task(
    ctx: dict[str, Any],
    completion_id: str,
    *,
    model_id: str,
    messages: list[tuple[str, str]],
    options: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> str:
    """Answer a background task; publish its events like a generation's."""
    st = state(ctx)
    request_id_var.set(request_id or "-")
    token = int(ctx.get("job_try", 1))
    await claim(st.redis, completion_id, token, ttls(st.settings))
    publisher = Publisher(st.redis, completion_id, token, ttls(st.settings), st.batcher)
    await publisher.start()
    try:
        outcome = await stream_model(
            st,
            model_id=model_id,
            prompt=TaskPrompt(messages),
            options=options or {},
            sink=publisher,
        )
    except Exception as exc:  # noqa: BLE001 - the client must hear of every failure
        error = exc if isinstance(exc, HaiaError) else HaiaError("The task failed unexpectedly.")
        log.warning("task %s failed: %s", completion_id, type(exc).__name__)
        end = Event(
            seq=0,
            type="end",
            status="failed",
            error=error.body()["error"],
            http_status=error.status,
            retry_after=error.retry_after,
        )
        await asyncio.shield(publisher.end(end))
        return "failed"
    usage = {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }
    end = Event(
        seq=0, type="end", status="completed", finish_reason=outcome.finish_reason, usage=usage
    )
    await publisher.end(end)
    return "completed"
