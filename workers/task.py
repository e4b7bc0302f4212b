"""The arq job for client background tasks (OpenWebUI's titles, tags, follow-ups).

They are answered like any generation, events and all, but are not conversation turns: nothing
of them is stored in the database.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app.config import Settings
from app.errors import HaiaError
from app.generations import publisher_for
from app.llm import translate_model_error
from app.logs import request_id_var
from workers.context import to_model_message
from workers.generate import stream_agent

log = logging.getLogger(__name__)


async def run_task(
    ctx: dict[str, Any],
    completion_id: str,
    *,
    model_id: str,
    messages: list[tuple[str, str]],
    sampling: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> str:
    """Answer a background task; publish its events like a generation's."""
    settings: Settings = ctx["settings"]
    request_id_var.set(request_id or "-")
    publisher = publisher_for(ctx["redis"], settings, completion_id)
    await publisher.emit("start", status="in_progress")

    async def on_delta(delta: str) -> None:
        await publisher.emit("delta", text=delta)

    try:
        prompt_tokens, completion_tokens, finish_reason = await stream_agent(
            ctx,
            agent=ctx["task_agent"],
            model_id=model_id,
            history=[to_model_message(role, text) for role, text in messages[:-1]],
            prompt=messages[-1][1],
            sampling=sampling or {},
            on_delta=on_delta,
        )
    except Exception as exc:  # noqa: BLE001 - the client must hear of every failure
        error = exc if isinstance(exc, HaiaError) else translate_model_error(exc, model_id=model_id)
        log.warning("task %s failed: %s", completion_id, type(exc).__name__)
        await asyncio.shield(
            publisher.emit(
                "end",
                status="failed",
                error=error.body()["error"],
                extra={"http_status": error.status},
            )
        )
        return "failed"
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    await publisher.emit("end", status="completed", finish_reason=finish_reason, usage=usage)
    return "completed"
