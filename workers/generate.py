"""The arq job: run the agent for one assistant turn, publish every delta, store the result."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypedDict

from pydantic_ai import Agent
from pydantic_ai.models import Model
from pydantic_ai.settings import ModelSettings
from redis.asyncio import Redis

from app.config import Settings
from app.db.models import FINISHED, Message, Status
from app.errors import HaiaError
from app.llm import build_model, translate_model_error
from app.logs import request_id_var
from workers.context import load_context
from workers.publish import Publisher

log = logging.getLogger(__name__)

_FINISH_REASONS = {"tool_call": "tool_calls", "error": "stop"}


class WorkerContext(TypedDict):
    """What `on_startup` puts in arq's ctx (arq adds its own keys beside these)."""

    settings: Settings
    redis: Redis
    agent: Agent[None, str]
    models: dict[str, Model]


@dataclass
class Outcome:
    """What a generation produced, stored whatever happened."""

    text: list[str] = field(default_factory=list)
    status: Status = Status.COMPLETED
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_at: datetime | None = None
    error: HaiaError | None = None

    def usage(self) -> dict[str, int] | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        prompt, completion = self.prompt_tokens or 0, self.completion_tokens or 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def _model(ctx: dict[str, Any], model_id: str) -> Model:
    cache: dict[str, Model] = ctx["models"]
    if model_id not in cache:
        cache[model_id] = build_model(model_id, ctx["settings"])
    return cache[model_id]


async def generate(
    ctx: dict[str, Any],
    completion_id: str,
    *,
    sampling: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> str:
    """Generate the assistant turn stored under `completion_id`; return its final status."""
    settings: Settings = ctx["settings"]
    request_id_var.set(request_id or "-")
    message = await Message.get_or_none(completion_id=completion_id)
    if message is None or message.status in FINISHED:
        return "skipped"
    publisher = Publisher(
        ctx["redis"],
        completion_id,
        running_ttl=settings.job_timeout + settings.replay_ttl,
        final_ttl=settings.replay_ttl,
    )
    await publisher.resume_numbering()
    message.status = Status.IN_PROGRESS
    message.started_at = datetime.now(UTC)
    await message.save(update_fields=["status", "started_at"])
    await publisher.emit("start", status=Status.IN_PROGRESS.value)
    log.info("generation %s started", completion_id)

    outcome = Outcome()
    try:
        await _run(ctx, message, publisher, outcome, sampling or {})
    except HaiaError as exc:
        outcome.status, outcome.error = Status.FAILED, exc
    except Exception as exc:
        outcome.status = Status.FAILED
        outcome.error = translate_model_error(exc, model_id=message.model or "")
        log.warning(
            "generation failed: %s",
            type(exc).__name__,
            exc_info=not isinstance(outcome.error, HaiaError) or outcome.error.status >= 500,
        )
    finally:
        # Store and announce the end even when the job is being cancelled.
        await asyncio.shield(_finish(message, publisher, outcome))
    return outcome.status.value


async def _run(
    ctx: dict[str, Any],
    message: Message,
    publisher: Publisher,
    outcome: Outcome,
    sampling: dict[str, Any],
) -> None:
    settings: Settings = ctx["settings"]
    agent: Agent[None, str] = ctx["agent"]
    history, prompt = await load_context(message, limit=settings.context_messages)
    model_settings = ModelSettings(timeout=settings.llm_timeout, **sampling)  # type: ignore[typeddict-item]
    async with agent.run_stream(
        prompt,
        message_history=history,
        model=_model(ctx, message.model or ""),
        model_settings=model_settings,
    ) as run:
        async for delta in run.stream_text(delta=True, debounce_by=None):
            if not delta:
                continue
            if outcome.first_token_at is None:
                outcome.first_token_at = datetime.now(UTC)
            outcome.text.append(delta)
            await publisher.emit("delta", text=delta)
        usage = run.usage
        finish = run.response.finish_reason
    outcome.prompt_tokens = usage.input_tokens
    outcome.completion_tokens = usage.output_tokens
    outcome.finish_reason = _FINISH_REASONS.get(finish or "stop", finish or "stop")


async def _finish(message: Message, publisher: Publisher, outcome: Outcome) -> None:
    message.content = "".join(outcome.text)
    message.status = outcome.status
    message.finish_reason = outcome.finish_reason
    message.prompt_tokens = outcome.prompt_tokens
    message.completion_tokens = outcome.completion_tokens
    message.first_token_at = outcome.first_token_at
    message.finished_at = datetime.now(UTC)
    message.error = outcome.error.body()["error"] if outcome.error else None
    await message.save()
    await publisher.emit(
        "end",
        status=outcome.status.value,
        finish_reason=outcome.finish_reason,
        usage=outcome.usage(),
        error=message.error,
        extra={"http_status": outcome.error.status} if outcome.error else {},
    )
