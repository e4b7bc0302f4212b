"""The arq job for client background tasks (OpenWebUI's titles, tags, follow-ups).

They are answered like any generation, events and all, but are not conversation turns: nothing
of them is stored in the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from app.errors import HaiaError
from app.events import Event
from app.generations import ttls
from app.logs import request_id_var
from app.publish import Publisher, claim
from app.upstreams import model_chain
from workers.lease import Lease
from workers.model_call import first_upstream, stream_model
from workers.state import WorkerState, state

log = logging.getLogger(__name__)


@dataclass
class TaskPrompt:
    """A task's messages as the client sent them; tasks bring their own instructions."""

    messages: list[tuple[str, str]]

    def model_messages(self, kind: str) -> list[Any]:
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
    lease = Lease(
        st.redis,
        completion_id=completion_id,
        worker=st.worker_id,
        arrival_ms=int(time.time() * 1000),
    )
    try:
        first = first_upstream(st, model_id)
        if first is not None and not await lease.enter(first):
            return "skipped"  # timed out in the queue while it waited for a slot
        return await _answer(st, ctx, completion_id, model_id, messages, options or {}, lease)
    finally:
        await asyncio.shield(lease.leave())


async def _answer(
    st: WorkerState,
    ctx: dict[str, Any],
    completion_id: str,
    model_id: str,
    messages: list[tuple[str, str]],
    options: dict[str, Any],
    lease: Lease,
) -> str:
    token = int(ctx.get("job_try", 1))
    await claim(st.redis, completion_id, token, ttls(st.settings))
    publisher = Publisher(st.redis, completion_id, token, ttls(st.settings), st.batcher)
    await publisher.start(model_chain(model_id, st.settings.aliases)[0])
    try:
        outcome = await stream_model(
            st,
            model_id=model_id,
            prompt=TaskPrompt(messages),
            options=options,
            sink=publisher,
            lease=lease,
            announce=publisher.start,
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
        seq=0,
        type="end",
        status="completed",
        model=outcome.model,
        finish_reason=outcome.finish_reason,
        usage=usage,
    )
    await publisher.end(end)
    return "completed"
