"""The arq job: run the agent for one assistant turn, publish every delta, store the result."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.exceptions import (
    ModelConnectionError,
    ModelRateLimitError,
    ModelTimeoutError,
    ModelUnavailableError,
)
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models import Model
from pydantic_ai.settings import ModelSettings
from redis.asyncio import Redis

from app import keys
from app.config import Settings
from app.db.models import FINISHED, Message, Status
from app.errors import HaiaError
from app.generations import (
    Ending,
    Inflight,
    claim_for_worker,
    end_without_worker,
    finish,
    logged_events,
    publisher_for,
)
from app.llm import build_model, translate_model_error
from app.logs import request_id_var
from app.publish import Publisher
from workers.context import load_context

log = logging.getLogger(__name__)

_FINISH_REASONS = {"tool_call": "tool_calls", "error": "stop"}
PROGRESS_EVERY = 16
"""Deltas between updates of the token count in `haia:inflight`."""


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
    redis: Redis = ctx["redis"]
    request_id_var.set(request_id or "-")
    message = await Message.get_or_none(completion_id=completion_id)
    if message is None or message.status in FINISHED:
        return "skipped"
    if await redis.exists(keys.gen_cancel(completion_id)):
        await end_without_worker(redis, settings, completion_id, status=Status.CANCELLED)
        return Status.CANCELLED.value
    if any(event.type == "delta" for event in await logged_events(redis, completion_id)):
        # An earlier attempt streamed text before its worker stopped: restarting would repeat
        # it to attached clients, so the generation ends here with what was said.
        await end_without_worker(redis, settings, completion_id, status=Status.INTERRUPTED)
        return Status.INTERRUPTED.value
    return await _generate(ctx, message, sampling or {})


async def _generate(ctx: dict[str, Any], message: Message, sampling: dict[str, Any]) -> str:
    settings: Settings = ctx["settings"]
    redis: Redis = ctx["redis"]
    completion_id = str(message.completion_id)
    publisher = publisher_for(redis, settings, completion_id)
    await publisher.resume_numbering()
    if not await claim_for_worker(completion_id):
        return "skipped"
    await message.refresh_from_db()
    inflight = Inflight(redis)
    await inflight.add(message, worker_id=ctx["worker_id"])
    await publisher.emit("start", status=Status.IN_PROGRESS.value)
    log.info("generation %s started on %s", completion_id, message.model)

    ending = Ending(status=Status.COMPLETED, text="")
    parts: list[str] = []
    try:
        await _run(ctx, message, publisher, ending, parts, sampling)
    except asyncio.CancelledError:
        if not await redis.exists(keys.gen_cancel(completion_id)):
            # Worker shutdown: arq hands the job back; its next run decides what to do.
            await asyncio.shield(inflight.remove(completion_id))
            raise
        ending.status, ending.finish_reason = Status.CANCELLED, "stop"
        await asyncio.shield(_end(message, publisher, ending, parts, inflight))
        raise
    except Exception as exc:
        ending.status = Status.FAILED
        ending.error = (
            exc
            if isinstance(exc, HaiaError)
            else translate_model_error(exc, model_id=message.model or "")
        )
        log.warning(
            "generation %s failed: %s",
            completion_id,
            type(exc).__name__,
            exc_info=ending.error.status == 500,
        )
    await asyncio.shield(_end(message, publisher, ending, parts, inflight))
    return ending.status.value


async def _end(
    message: Message, publisher: Publisher, ending: Ending, parts: list[str], inflight: Inflight
) -> None:
    ending.text = "".join(parts)
    await finish(message, publisher, ending)
    await inflight.remove(str(message.completion_id))


async def _run(
    ctx: dict[str, Any],
    message: Message,
    publisher: Publisher,
    ending: Ending,
    parts: list[str],
    sampling: dict[str, Any],
) -> None:
    settings: Settings = ctx["settings"]
    inflight = Inflight(ctx["redis"])
    completion_id = str(message.completion_id)
    entry = await inflight.get(completion_id) or {}
    history, prompt = await load_context(message, limit=settings.context_messages)
    log.debug("context for %s: %d stored messages + the new turn", completion_id, len(history))

    async def on_delta(delta: str) -> None:
        if ending.first_token_at is None:
            ending.first_token_at = datetime.now(UTC)
        parts.append(delta)
        await publisher.emit("delta", text=delta)
        if len(parts) % PROGRESS_EVERY == 0:
            await inflight.progress(completion_id, entry, len(parts))

    result = await stream_agent(
        ctx,
        agent=ctx["agent"],
        model_id=message.model or "",
        history=history,
        prompt=prompt,
        sampling=sampling,
        on_delta=on_delta,
    )
    ending.prompt_tokens, ending.completion_tokens, ending.finish_reason = result


async def stream_agent(
    ctx: dict[str, Any],
    *,
    agent: Agent[None, str],
    model_id: str,
    history: list[ModelMessage],
    prompt: str,
    sampling: dict[str, Any],
    on_delta: Callable[[str], Awaitable[None]],
) -> tuple[int, int, str]:
    """Run `agent` on the model, handing every text delta to `on_delta`.

    Transient upstream failures (rate limit with a known wait, overload, refused connection)
    are retried with a bounded backoff, and only while no text has been sent: a failure
    mid-stream is never retried silently. The SDKs' own retries are off so the bound is HAIA's.
    Returns (prompt tokens, completion tokens, OpenAI finish reason).
    """
    settings: Settings = ctx["settings"]
    sent = False

    async def forward(delta: str) -> None:
        nonlocal sent
        sent = True
        await on_delta(delta)

    for attempt in range(settings.llm_retries + 1):
        try:
            return await _attempt(ctx, agent, model_id, history, prompt, sampling, forward)
        except _TRANSIENT as exc:
            wait = _retry_wait(exc, attempt, settings)
            if sent or attempt == settings.llm_retries or wait is None:
                raise
            log.info(
                "upstream %s (%s); retry %d in %.1fs",
                model_id,
                type(exc).__name__,
                attempt + 1,
                wait,
            )
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")


_TRANSIENT = (ModelRateLimitError, ModelUnavailableError, ModelConnectionError)


def _retry_wait(exc: Exception, attempt: int, settings: Settings) -> float | None:
    """Seconds to wait before retrying `exc`, or None when it must not be retried."""
    if isinstance(exc, ModelTimeoutError):
        return None  # silence past HAIA_LLM_TIMEOUT is not transient
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(exc, ModelRateLimitError) and retry_after is None:
        return None  # e.g. a spend limit: waiting will not help
    wait = float(retry_after) if retry_after is not None else min(0.5 * 2**attempt, 8.0)
    return wait if wait <= settings.llm_retry_max_wait else None


async def _attempt(
    ctx: dict[str, Any],
    agent: Agent[None, str],
    model_id: str,
    history: list[ModelMessage],
    prompt: str,
    sampling: dict[str, Any],
    on_delta: Callable[[str], Awaitable[None]],
) -> tuple[int, int, str]:
    settings: Settings = ctx["settings"]
    model_settings = ModelSettings(timeout=settings.llm_timeout, max_retries=0, **sampling)  # type: ignore[typeddict-item]
    async with agent.run_stream(
        prompt,
        message_history=history,
        model=_model(ctx, model_id),
        model_settings=model_settings,
    ) as run:
        async for delta in run.stream_text(delta=True, debounce_by=None):
            if delta:
                await on_delta(delta)
        usage = run.usage
        finish_reason = run.response.finish_reason or "stop"
    return (
        usage.input_tokens,
        usage.output_tokens,
        _FINISH_REASONS.get(finish_reason, finish_reason),
    )
