"""One model request, whatever the upstream: an alias's fallbacks, retries, and the wire.

OpenAI-compatible upstreams (Ollama, vLLM, LM Studio, OpenAI) are spoken to directly
(`workers.openai_wire`); Anthropic through pydantic-ai's direct streaming API
(`workers.pydantic_model`, imported on first use). The per-token path is the wire's SSE
parsing, one list append and one buffered publish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.errors import HaiaError, ModelNotFound, RateLimited
from app.generations import Ending, add_tool_piece, assembled
from app.publish import Fenced
from app.upstreams import Upstream, model_chain, split_model_id
from workers.lease import Lease
from workers.openai_wire import Endpoint, Transient
from workers.state import WorkerState

log = logging.getLogger(__name__)

_FINISH_REASONS = {"tool_call": "tool_calls", "error": "stop"}


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
class Outcome:
    """What the model's response says beyond its deltas."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_parts: list[dict[str, Any]] | None = None
    model: str | None = None
    """The model that answered."""
    reasoning_tokens: int | None = None
    """Of `completion_tokens`, the thinking, when the upstream reported it."""

    def apply(self, ending: Ending) -> None:
        ending.prompt_tokens, ending.completion_tokens = self.prompt_tokens, self.completion_tokens
        ending.reasoning_tokens = self.reasoning_tokens
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
    details = usage.get("completion_tokens_details") or {}
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return Outcome(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        finish_reason=_FINISH_REASONS.get(result["finish_reason"], result["finish_reason"]),
        tool_calls=collector.calls(),
        reasoning_tokens=reasoning if isinstance(reasoning, int) else None,
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
