"""The arq job: one model request for one assistant turn, every delta published, the end stored.

A gateway makes one model request per turn and runs no agent loop. OpenAI-compatible upstreams
are spoken to directly (`workers.openai_wire`); others through pydantic-ai's direct streaming
API (`workers.pydantic_model`, imported on first use). The per-token path is the wire's SSE
parsing, one list append and one buffered publish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from app import keys
from app.db.models import FINISHED, Message, Status
from app.errors import HaiaError, InvalidRequest, RateLimited, UpstreamTimeout
from app.events import Event
from app.generations import (
    Ending,
    add_tool_piece,
    assembled,
    end_as,
    end_run,
    take_fence,
    ttls,
)
from app.inflight import Inflight
from app.llm import (
    openai_endpoint,
    split_model_id,
)
from app.logs import request_id_var
from app.publish import Fenced, Publisher
from workers.context import load_context
from workers.openai_wire import Endpoint, Transient
from workers.state import WorkerState, state

log = logging.getLogger(__name__)

_FINISH_REASONS = {"tool_call": "tool_calls", "error": "stop"}
PROGRESS_EVERY = 16
"""Deltas between updates of the token count in `haia:inflight`."""


async def generate(
    ctx: dict[str, Any],
    completion_id: str,
    *,
    options: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> str:
    """Generate the assistant turn stored under `completion_id`; return its final status."""
    st = state(ctx)
    request_id_var.set(request_id or "-")
    message = await Message.get_or_none(completion_id=completion_id)
    if message is None or message.status in FINISHED:
        return "skipped"
    # What Redis knows of it, in one round trip: ended? cancelled? text from an earlier run?
    pipe = st.redis.pipeline(transaction=False)
    pipe.get(keys.gen_fence(completion_id))
    pipe.exists(keys.gen_cancel(completion_id))
    pipe.lrange(keys.gen_log(completion_id), 0, -1)
    fence, cancelled, logged = await pipe.execute()
    if fence == b"end":
        return "skipped"  # ended elsewhere (cancelled while queued, timed out in the queue)
    if cancelled:
        await end_as(st.redis, st.settings, completion_id, status=Status.CANCELLED)
        return Status.CANCELLED.value
    if any(Event.from_json(raw).type == "delta" for raw in logged):
        # An earlier run streamed text before its worker stopped: restarting would repeat it
        # to attached clients, so the generation ends here with what was said.
        await end_as(st.redis, st.settings, completion_id, status=Status.INTERRUPTED)
        return Status.INTERRUPTED.value
    run = await take_fence(st.redis, st.settings, message, status=Status.IN_PROGRESS)
    if run is None:
        return "skipped"
    publisher = Publisher(st.redis, completion_id, run.token, ttls(st.settings), st.batcher)
    return await _generate(st, message, publisher, options or {})


class Sink(Protocol):
    """Where a model's deltas go, by kind."""

    def delta(self, text: str) -> None: ...
    def reasoning(self, text: str) -> None: ...
    def tool(self, piece: dict[str, Any]) -> None: ...


@dataclass
class _Progress:
    """What a run has produced so far; forwards every delta to the run's publisher."""

    publisher: Publisher
    on_count: Callable[[int], None]
    parts: list[str] = field(default_factory=list)
    reasoning_parts: list[str] = field(default_factory=list)
    first_token_at: datetime | None = None
    count: int = 0

    def _seen(self) -> None:
        if self.publisher.fenced:
            raise Fenced(self.publisher.completion_id)
        if self.first_token_at is None:
            self.first_token_at = datetime.now(UTC)
        self.count += 1
        if self.count % PROGRESS_EVERY == 0:
            self.on_count(self.count)

    def delta(self, text: str) -> None:
        self._seen()
        self.parts.append(text)
        self.publisher.delta(text)

    def reasoning(self, text: str) -> None:
        self._seen()
        self.reasoning_parts.append(text)
        self.publisher.reasoning(text)

    def tool(self, piece: dict[str, Any]) -> None:
        self._seen()
        self.publisher.tool(piece)


async def _generate(
    st: WorkerState, message: Message, publisher: Publisher, options: dict[str, Any]
) -> str:
    completion_id = str(message.completion_id)
    inflight = Inflight(st.redis)
    entry = inflight.running_entry(
        conversation=message.conversation_id,  # type: ignore[attr-defined]
        model=message.model or "",
        request_id=message.request_id or "-",
        worker=st.worker_id,
        attempt=publisher.token,
    )
    await asyncio.gather(inflight.running(completion_id, entry), publisher.start())
    log.info("generation %s started on %s (run %d)", completion_id, message.model, publisher.token)

    ending = Ending(status=Status.COMPLETED)
    progress = _Progress(
        publisher=publisher,
        on_count=lambda n: st.batcher.later(inflight.progress(completion_id, entry, n)),
    )
    try:
        async with asyncio.timeout(st.settings.job_timeout) as deadline:
            context = await load_context(
                message, limit=st.settings.context_messages, responses=options.get("responses")
            )
            ending.previous_hash = context.rows[-1].prefix_hash  # the turn this answers
            outcome = await stream_model(
                st,
                model_id=message.model or "",
                prompt=context,
                options=options,
                sink=progress,
            )
        outcome.apply(ending)
    except Fenced:
        log.warning("generation %s: this run was superseded; stopping it", completion_id)
        return "superseded"
    except asyncio.CancelledError:
        if st.shutting_down and not await st.redis.exists(keys.gen_cancel(completion_id)):
            # Worker shutdown: arq hands the job back; its next run decides what to do. What
            # was said so far must be in the log for that decision.
            await asyncio.shield(_hand_back(publisher, inflight, completion_id))
            raise
        ending.status, ending.finish_reason = Status.CANCELLED, "stop"
        await asyncio.shield(_end(publisher, message, ending, progress, inflight))
        raise
    except Exception as exc:
        ending.status = Status.FAILED
        ending.error = _failure(exc, st, message, timed_out=deadline.expired())
        log.warning(
            "generation %s failed: %s",
            completion_id,
            type(exc).__name__,
            exc_info=ending.error.status == 500,
        )
    await asyncio.shield(_end(publisher, message, ending, progress, inflight))
    return ending.status.value


def _failure(exc: Exception, st: WorkerState, message: Message, *, timed_out: bool) -> HaiaError:
    if isinstance(exc, TimeoutError) and timed_out:
        return UpstreamTimeout(
            f"The generation ran longer than HAIA_JOB_TIMEOUT "
            f"({st.settings.job_timeout} s); the partial answer was kept.",
            code="generation_timeout",
        )
    if isinstance(exc, HaiaError):
        return exc
    if isinstance(exc, LookupError):  # from load_context: the stored turn has nothing to answer
        return InvalidRequest(f"Nothing to answer: {exc}.", param="messages")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("The model's server did not answer within HAIA_LLM_TIMEOUT.")
    return HaiaError("The generation failed unexpectedly.")


async def _hand_back(publisher: Publisher, inflight: Inflight, completion_id: str) -> None:
    try:
        await publisher.flush()
    finally:
        await inflight.remove(completion_id)


async def _end(
    publisher: Publisher,
    message: Message,
    ending: Ending,
    progress: _Progress,
    inflight: Inflight,
) -> None:
    ending.text = "".join(progress.parts)
    ending.reasoning = "".join(progress.reasoning_parts)
    ending.first_token_at = progress.first_token_at
    try:
        await end_run(publisher, message, ending)
    finally:
        await inflight.remove(str(message.completion_id))


@dataclass
class Outcome:
    """What the model's response says beyond its deltas."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_parts: list[dict[str, Any]] | None = None

    def apply(self, ending: Ending) -> None:
        ending.prompt_tokens, ending.completion_tokens = self.prompt_tokens, self.completion_tokens
        ending.finish_reason = self.finish_reason
        ending.tool_calls, ending.reasoning_parts = self.tool_calls, self.reasoning_parts


class Prompt(Protocol):
    """What a model request carries, renderable for either wire."""

    def model_messages(self) -> list[Any]: ...
    def openai_messages(self) -> list[dict[str, Any]]: ...


async def stream_model(
    st: WorkerState,
    *,
    model_id: str,
    prompt: Prompt,
    options: dict[str, Any],
    sink: Sink,
) -> Outcome:
    """Stream one model response into `sink`: content, reasoning and tool-call deltas.

    Transient upstream failures (rate limit with a known wait, overload, refused connection)
    are retried with a bounded backoff, and only while nothing has been sent: a failure
    mid-stream is never retried silently. The SDKs' own retries are off so the bound is HAIA's.
    """
    settings = st.settings
    watched = _Watched(sink)
    for attempt in range(settings.llm_retries + 1):
        try:
            if model_id.partition(":")[0] in OPENAI_WIRE_PROVIDERS:
                return await _request_openai(st, model_id, prompt, options, watched)
            return await _request_pydantic(st, model_id, prompt, options, watched)
        except Transient as exc:
            wait = _retry_wait(exc, attempt, settings.llm_retry_max_wait)
            if watched.sent or attempt == settings.llm_retries or wait is None:
                raise exc.error from None
            log.info(
                "upstream %s (%s); retry %d in %.1fs",
                model_id,
                type(exc).__name__,
                attempt + 1,
                wait,
            )
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")


@dataclass
class _Watched:
    """A sink that remembers whether anything reached it (then no retry may repeat it)."""

    inner: Sink
    sent: bool = False

    def delta(self, text: str) -> None:
        self.sent = True
        self.inner.delta(text)

    def reasoning(self, text: str) -> None:
        self.sent = True
        self.inner.reasoning(text)

    def tool(self, piece: dict[str, Any]) -> None:
        self.sent = True
        self.inner.tool(piece)


def _retry_wait(exc: Transient, attempt: int, max_wait: float) -> float | None:
    """Seconds to wait before retrying `exc`, or None when it must not be retried."""
    retry_after = exc.error.retry_after
    if isinstance(exc.error, RateLimited) and retry_after is None:
        return None  # e.g. a spend limit: waiting will not help
    wait = float(retry_after) if retry_after is not None else min(0.5 * 2**attempt, 8.0)
    return wait if wait <= max_wait else None


async def _request_pydantic(
    st: WorkerState, model_id: str, prompt: Prompt, options: dict[str, Any], sink: Sink
) -> Outcome:
    from workers import pydantic_model  # loaded only when such a model is used

    collector = _ToolCalls(sink)  # stored as streamed: what the client will send back
    result = await pydantic_model.stream(
        st.models, st.settings, model_id, prompt.model_messages(), options, collector
    )
    return Outcome(
        prompt_tokens=result["prompt_tokens"],
        completion_tokens=result["completion_tokens"],
        finish_reason=_FINISH_REASONS.get(result["finish_reason"], result["finish_reason"]),
        tool_calls=collector.calls(),
        reasoning_parts=result["reasoning_parts"],
    )


OPENAI_WIRE_PROVIDERS = frozenset({"ollama", "openai-chat"})


async def _request_openai(
    st: WorkerState, model_id: str, prompt: Prompt, options: dict[str, Any], sink: Sink
) -> Outcome:
    provider, name = split_model_id(model_id)
    base_url, api_key = openai_endpoint(provider, st.settings)
    body: dict[str, Any] = {
        **options.get("openai", {}),
        "model": name,
        "messages": prompt.openai_messages(),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    collector = _ToolCalls(sink)
    result = await st.wire.stream(Endpoint(provider, base_url, api_key), body, collector)
    usage = result.get("usage") or {}
    return Outcome(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        finish_reason=_FINISH_REASONS.get(result["finish_reason"], result["finish_reason"]),
        tool_calls=collector.calls(),
    )


@dataclass
class _ToolCalls:
    """Forwards deltas, assembling the tool calls for storage on the way."""

    inner: Sink
    pieces: dict[int, dict[str, Any]] = field(default_factory=dict)

    def delta(self, text: str) -> None:
        self.inner.delta(text)

    def reasoning(self, text: str) -> None:
        self.inner.reasoning(text)

    def tool(self, piece: dict[str, Any]) -> None:
        add_tool_piece(self.pieces, piece)
        self.inner.tool(piece)

    def calls(self) -> list[dict[str, Any]] | None:
        return assembled(self.pieces)
