"""The arq job: one model request for one assistant turn, every delta published, the end stored.

A gateway makes one model request per turn and runs no agent loop. OpenAI-compatible upstreams
are spoken to directly (`workers.openai_wire`); others through pydantic-ai's direct streaming
API (`workers.pydantic_model`, imported on first use). The per-token path is the wire's SSE
parsing, one list append and one buffered publish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from app import keys
from app.db.models import FINISHED, Message, Status
from app.errors import HaiaError, InvalidRequest, ModelNotFound, RateLimited, UpstreamTimeout
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
from app.logs import request_id_var
from app.publish import Fenced, Publisher
from app.upstreams import Upstream, model_chain, split_model_id
from workers.context import load_context
from workers.lease import Lease
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
    lease = Lease(
        st.redis,
        completion_id=completion_id,
        worker=st.worker_id,
        arrival_ms=int(message.created_at.timestamp() * 1000),
    )
    try:
        return await _take_and_run(st, message, lease, options or {})
    finally:
        await asyncio.shield(lease.leave())


async def _take_and_run(
    st: WorkerState, message: Message, lease: Lease, options: dict[str, Any]
) -> str:
    """Wait (still `queued`) for a slot on the first model's upstream, then run."""
    completion_id = str(message.completion_id)
    first = first_upstream(st, message.model or "")
    if first is not None and first.max_concurrent:

        async def waiting(upstream: Upstream) -> None:
            log.info("generation %s waits for a slot on %s", completion_id, upstream.name)
            await Inflight(st.redis).waiting(
                completion_id,
                conversation=message.conversation_id,  # type: ignore[attr-defined]
                model=message.model or "",
                request_id=message.request_id or "-",
                worker=st.worker_id,
                upstream=upstream.name,
            )

        if not await lease.enter(first, on_wait=waiting):
            if await st.redis.exists(keys.gen_cancel(completion_id)):
                await end_as(st.redis, st.settings, completion_id, status=Status.CANCELLED)
            return "skipped"  # ended while it waited (cancelled, or timed out in the queue)
    run = await take_fence(st.redis, st.settings, message, status=Status.IN_PROGRESS)
    if run is None:
        return "skipped"
    publisher = Publisher(st.redis, completion_id, run.token, ttls(st.settings), st.batcher)
    return await _generate(st, message, publisher, options, lease)


def first_upstream(st: WorkerState, model_id: str) -> Upstream | None:
    """The upstream of the first model `model_id` (or its alias) tries."""
    target = split_model_id(model_chain(model_id, st.settings.aliases)[0], st.settings.upstreams)
    return target[0] if target else None


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
    model: str | None = None
    """The model answering now."""

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
    st: WorkerState, message: Message, publisher: Publisher, options: dict[str, Any], lease: Lease
) -> str:
    completion_id = str(message.completion_id)
    inflight = Inflight(st.redis)
    model = model_chain(message.model or "", st.settings.aliases)[0]
    entry = inflight.running_entry(
        conversation=message.conversation_id,  # type: ignore[attr-defined]
        model=model,
        request_id=message.request_id or "-",
        worker=st.worker_id,
        attempt=publisher.token,
    )
    await asyncio.gather(inflight.running(completion_id, entry), publisher.start(model))
    log.info("generation %s started on %s (run %d)", completion_id, model, publisher.token)

    ending = Ending(status=Status.COMPLETED)
    progress = _Progress(
        publisher=publisher,
        on_count=lambda n: st.batcher.later(inflight.progress(completion_id, entry, n)),
        model=model,
    )

    async def announce(fallback: str) -> None:
        progress.model = entry["model"] = fallback
        await asyncio.gather(inflight.running(completion_id, entry), publisher.start(fallback))

    try:
        async with asyncio.timeout(st.settings.job_timeout) as deadline:
            context = await load_context(message, limit=st.settings.context_messages)
            ending.previous_hash = context.rows[-1].prefix_hash  # the turn this answers
            outcome = await stream_model(
                st,
                model_id=message.model or "",
                prompt=context,
                options=options,
                sink=progress,
                lease=lease,
                announce=announce,
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
    if ending.status == Status.COMPLETED or progress.count:
        ending.model = progress.model  # it answered, at least in part
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
    model: str | None = None
    """The model that answered."""

    def apply(self, ending: Ending) -> None:
        ending.prompt_tokens, ending.completion_tokens = self.prompt_tokens, self.completion_tokens
        ending.finish_reason = self.finish_reason
        ending.tool_calls, ending.reasoning_parts = self.tool_calls, self.reasoning_parts


class Prompt(Protocol):
    """What a model request carries, renderable for either wire."""

    def model_messages(self, kind: str) -> list[Any]: ...
    def openai_messages(self) -> list[dict[str, Any]]: ...


async def stream_model(
    st: WorkerState,
    *,
    model_id: str,
    prompt: Prompt,
    options: dict[str, Any],
    sink: Sink,
    lease: Lease | None = None,
    announce: Callable[[str], Awaitable[None]] | None = None,
) -> Outcome:
    """Stream one model response into `sink`: content, reasoning and tool-call deltas.

    An alias's models are tried in order: the next one when one fails before its first token
    (unreachable, overloaded, rate-limited, any error), announced with `announce` before it
    answers; never once something was sent. Each holds a slot of its upstream (`lease`) when
    that upstream is limited. The last (or only) model's transient failures (rate limit with
    a known wait, overload, refused connection) are retried with a bounded backoff, also only
    while nothing has been sent. The SDKs' own retries are off so the bound is HAIA's.
    """
    chain = model_chain(model_id, st.settings.aliases)
    watched = _Watched(sink)
    for index, candidate in enumerate(chain):
        last = index == len(chain) - 1
        try:
            target = split_model_id(candidate, st.settings.upstreams)
            if target is None:
                raise ModelNotFound(f"The model {candidate!r} names no upstream HAIA knows.")
            upstream, name = target
            if lease is not None and not await lease.enter(upstream):
                raise Fenced(candidate)  # ended elsewhere while it waited for a slot
            if index and announce is not None:
                await announce(candidate)
            retries = st.settings.llm_retries if last else 0
            outcome = await _attempts(st, upstream, name, prompt, options, watched, retries)
        except HaiaError as exc:
            if watched.sent or last:
                raise
            log.warning(
                "%s failed before its first token (%s); trying %s",
                candidate,
                exc.code,
                chain[index + 1],
            )
            continue
        outcome.model = candidate
        return outcome
    raise AssertionError("unreachable")


async def _attempts(
    st: WorkerState,
    upstream: Upstream,
    name: str,
    prompt: Prompt,
    options: dict[str, Any],
    watched: _Watched,
    retries: int,
) -> Outcome:
    for attempt in range(retries + 1):
        try:
            if upstream.kind == "anthropic":
                return await _request_pydantic(st, upstream, name, prompt, options, watched)
            return await _request_openai(st, upstream, name, prompt, options, watched)
        except Transient as exc:
            wait = _retry_wait(exc, attempt, st.settings.llm_retry_max_wait)
            if watched.sent or attempt == retries or wait is None:
                raise exc.error from None
            log.info(
                "upstream %s:%s (%s); retry %d in %.1fs",
                upstream.name,
                name,
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
    st: WorkerState,
    upstream: Upstream,
    name: str,
    prompt: Prompt,
    options: dict[str, Any],
    sink: Sink,
) -> Outcome:
    from workers import pydantic_model  # loaded only when such a model is used

    collector = _ToolCalls(sink)  # stored as streamed: what the client will send back
    messages = prompt.model_messages(upstream.kind)
    result = await pydantic_model.stream(
        st.models, st.settings, upstream, name, messages, options, collector
    )
    return Outcome(
        prompt_tokens=result["prompt_tokens"],
        completion_tokens=result["completion_tokens"],
        finish_reason=_FINISH_REASONS.get(result["finish_reason"], result["finish_reason"]),
        tool_calls=collector.calls(),
        reasoning_parts=result["reasoning_parts"],
    )


async def _request_openai(
    st: WorkerState,
    upstream: Upstream,
    name: str,
    prompt: Prompt,
    options: dict[str, Any],
    sink: Sink,
) -> Outcome:
    body: dict[str, Any] = {
        **options.get("openai", {}),
        "model": name,
        "messages": prompt.openai_messages(),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    collector = _ToolCalls(sink)
    result = await st.wire.stream(Endpoint(upstream), body, collector)
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
