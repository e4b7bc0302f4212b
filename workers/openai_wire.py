"""HAIA's own streaming client for OpenAI-compatible chat servers (Ollama's `/v1`, vLLM,
llama.cpp, LM Studio, OpenAI).

Why not pydantic-ai here: measured at 500 concurrent streams, its streaming layers and the
`openai` SDK's SSE parsing and per-chunk model construction took over half of the worker's CPU
(about 1 ms per token), capping one worker near 1,000 tokens/s. A gateway speaking the same
wire on both sides needs none of that: the stored conversation is already in the OpenAI shape,
so the request is built from it directly and the client's own fields go through as sent, and
each SSE line costs one `json.loads`. Anthropic models still go through pydantic-ai, which
translates that wire.

Errors are translated here into HAIA's own types, with the same meaning as `app.llm`'s
translation of pydantic-ai's errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.errors import (
    HaiaError,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from app.http1 import ConnectionClosed, ProtocolError, SSEClient, proxy_for
from app.upstreams import Upstream

if TYPE_CHECKING:
    from workers.proxied import ProxiedSession


class Transient(HaiaError):
    """A failure worth retrying before the first token (`error` is what the client gets)."""

    def __init__(self, error: HaiaError) -> None:
        super().__init__(error.message, retry_after=error.retry_after)
        self.error = error


@dataclass(frozen=True)
class Endpoint:
    """Where a request goes: an upstream, by its name in messages and its variables."""

    upstream: Upstream

    @property
    def provider(self) -> str:
        return self.upstream.name


class OpenAIWire:
    """The worker's connections to OpenAI-compatible servers, shared by every generation.

    Direct connections go through `SSEClient` (`app/http1.py`), which parses the SSE
    answer where its bytes arrive, with no task switch per chunk. Requests through an HTTP(S)
    proxy go through aiohttp (`workers.proxied`, imported on the first such request), whose C
    parser also made it the cheaper of the two libraries measured before (httpx's pure-Python
    stack took a fifth of the worker's CPU at 500 streams). HTTP(S)_PROXY are honoured as the
    SDKs honour them, looked up once per upstream (`proxy_for`).
    """

    def __init__(self, *, timeout: float) -> None:
        self._timeout = timeout
        self._proxied: ProxiedSession | None = None
        self._direct = SSEClient(connect_timeout=10.0, read_timeout=timeout)

    def _proxied_session(self) -> ProxiedSession:
        if self._proxied is None:
            from workers.proxied import ProxiedSession  # aiohttp: only when a proxy is used

            self._proxied = ProxiedSession(timeout=self._timeout)
        return self._proxied

    async def aclose(self) -> None:
        self._direct.close()
        if self._proxied is not None:
            await self._proxied.close()

    async def stream(self, endpoint: Endpoint, body: dict[str, Any], sink: Any) -> dict[str, Any]:
        """POST a streaming chat completion; deltas go to `sink` (`delta`, `reasoning`,
        `tool`). Returns {"finish_reason", "usage"}."""
        headers = {"Accept": "text/event-stream"}
        if endpoint.upstream.api_key:
            headers["Authorization"] = f"Bearer {endpoint.upstream.api_key}"
        url = endpoint.upstream.openai_base_url.rstrip("/") + "/chat/completions"
        server = f"The model's server ({endpoint.provider})"
        proxy = proxy_for(url)
        try:
            if proxy is None:
                return await self._stream_direct(endpoint, url, body, headers, sink)
            return await self._proxied_session().stream(endpoint, url, body, headers, proxy, sink)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"{server} did not answer within HAIA_LLM_TIMEOUT.") from exc
        except OSError as exc:
            raise Transient(
                Unavailable(f"{server} is unreachable; check {endpoint.upstream.url_variable}.")
            ) from exc
        except (ConnectionClosed, ProtocolError) as exc:
            raise UpstreamError(f"{server} closed the connection.") from exc

    async def _stream_direct(
        self,
        endpoint: Endpoint,
        url: str,
        body: dict[str, Any],
        headers: dict[str, str],
        sink: Any,
    ) -> dict[str, Any]:
        state: dict[str, Any] = {"finish_reason": None, "usage": None}
        done = False

        def on_data(data: bytes) -> bool:
            nonlocal done
            done = _event(endpoint, data, sink, state)
            return done

        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        answer = await self._direct.post(url, payload, headers, on_data)
        if answer.status != 200:
            raise _status_error(endpoint, body, answer.status, answer.headers, answer.body)
        return _outcome(endpoint, state, done=done)


def _outcome(endpoint: Endpoint, state: dict[str, Any], *, done: bool) -> dict[str, Any]:
    """How a read answer ended: at `[DONE]` (finished, `stop` unless it said otherwise), or
    when the body ended without it: finished only if a finish reason came."""
    if done:
        return {**state, "finish_reason": state["finish_reason"] or "stop"}
    if state["finish_reason"] is None:
        raise UpstreamError(f"The model's server ({endpoint.provider}) cut the answer short.")
    return state


def _event(endpoint: Endpoint, data: bytes, sink: Any, state: dict[str, Any]) -> bool:
    """Handle one SSE data line; True at `[DONE]`."""
    if data == b"[DONE]":
        return True
    try:
        event = _decode(data)
    except (ValueError, StopIteration) as exc:  # StopIteration: the scanner found no value
        raise _unusable(endpoint) from exc
    if not isinstance(event, dict):
        raise _unusable(endpoint)
    if "error" in event:
        raise UpstreamError(
            f"The model's server ({endpoint.provider}) failed mid-answer: "
            f"{_message_of(event['error'])}"
        )
    if event.get("usage"):
        state["usage"] = event["usage"]
    for choice in event.get("choices") or ():
        _deliver(choice.get("delta") or {}, sink)
        if choice.get("finish_reason"):
            state["finish_reason"] = choice["finish_reason"]
    return False


_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _decode(data: bytes) -> Any:
    """`json.loads(data)` for a stripped line, at half its cost: the C scanner called
    directly, without `loads`' detection of the bytes' encoding and its layers of calls (a
    few microseconds for every token)."""
    text = data.decode()
    value, end = _scan(text, 0)
    if end != len(text):
        return json.loads(text)  # something after the value: `loads` says what is wrong
    return value


def _deliver(delta: dict[str, Any], sink: Any) -> None:
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    if reasoning:
        sink.reasoning(reasoning)
    content = delta.get("content")
    if content:
        sink.delta(content)
    for call in delta.get("tool_calls") or ():
        function = call.get("function") or {}
        piece: dict[str, Any] = {"index": int(call.get("index") or 0)}
        if call.get("id"):
            piece["id"] = call["id"]
        if function.get("name"):
            piece["name"] = function["name"]
        piece["arguments"] = function.get("arguments") or ""
        sink.tool(piece)


def _unusable(endpoint: Endpoint) -> HaiaError:
    return UpstreamError(
        f"The model's server ({endpoint.provider}) sent an answer HAIA cannot use."
    )


def _message_of(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or "unknown error")[:300]
    return str(error)[:300]


def _status_error(
    endpoint: Endpoint, body: dict[str, Any], status: int, headers: Any, raw: bytes
) -> HaiaError:
    server = f"The model's server ({endpoint.provider})"
    retry_after = _retry_after(headers.get("retry-after"))
    try:
        detail = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        detail = None
    code = detail.get("code") if isinstance(detail, dict) else None
    message = _message_of(detail) if detail else ""
    if status in (401, 403):
        return Unauthorized(
            f"{server} rejected HAIA's credentials; check {endpoint.upstream.key_variable}.",
            code="upstream_authentication_failed",
        )
    if status == 404:
        return ModelNotFound(
            f"The model {endpoint.provider}:{body.get('model')} does not exist on its server."
        )
    if status == 429:
        if code == "insufficient_quota":
            return RateLimited(
                f"{server} says HAIA's account is out of quota or credit; check the plan "
                f"behind {endpoint.upstream.key_variable}.",
                code="insufficient_quota",
            )
        limited = RateLimited(f"{server} is rate limiting requests.", retry_after=retry_after)
        return Transient(limited) if retry_after is not None else limited
    if status in (503, 529):
        return Transient(
            Unavailable(f"{server} is overloaded; try again shortly.", retry_after=retry_after)
        )
    if 400 <= status < 500:
        if code == "context_length_exceeded" or "context length" in message.lower():
            return InvalidRequest(
                f"{server} says the conversation is longer than the model's context window.",
                code="context_length_exceeded",
                param="messages",
            )
        return InvalidRequest(f"{server} rejected the request (status {status}).")
    return UpstreamError(f"{server} failed (status {status}).")


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
