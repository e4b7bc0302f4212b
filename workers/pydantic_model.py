"""Models through pydantic-ai: Anthropic (and any provider HAIA does not speak itself).

Imported only when such a model is used: pydantic-ai's provider modules cost about 80 MB per
process. Builds the model, translates the job's options into its settings and tool
definitions, renders stored rows as pydantic-ai messages, streams one response into a sink,
and translates pydantic-ai's errors into HAIA's own types (transient ones as `Transient`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

from anthropic import AsyncAnthropic
from pydantic_ai.direct import model_request_stream
from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelAuthenticationError,
    ModelConnectionError,
    ModelNotFoundError,
    ModelQuotaExceededError,
    ModelRateLimitError,
    ModelTimeoutError,
    ModelUnavailableError,
    UnexpectedModelBehavior,
)
from pydantic_ai.messages import (
    BinaryContent,
    ImageUrl,
    ModelMessage,
    ModelRequest,
    ModelRequestPart,
    ModelResponse,
    ModelResponsePart,
    PartDeltaEvent,
    PartStartEvent,
    SystemPromptPart,
    TextPart,
    TextPartDelta,
    ThinkingPart,
    ThinkingPartDelta,
    ToolCallPart,
    ToolCallPartDelta,
    ToolReturnPart,
    UserContent,
    UserPromptPart,
)
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.models.anthropic import AnthropicModel
from pydantic_ai.models.ollama import OllamaModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.anthropic import AnthropicProvider
from pydantic_ai.providers.ollama import OllamaProvider
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import ToolDefinition

from app.config import Settings
from app.content import BLOB_SCHEME
from app.db.models import Blob
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
from app.prompts import HOMELAB_ASSISTANT_PROMPT
from app.upstreams import Upstream
from workers.context import ContextRow
from workers.openai_wire import Transient


def build_model(upstream: Upstream, name: str) -> Model:
    """A pydantic-ai model for `name` on `upstream`, with its own URL and key."""
    if upstream.kind == "ollama":
        return OllamaModel(name, provider=OllamaProvider(base_url=upstream.openai_base_url))
    if upstream.kind == "anthropic":
        # A client of our own: the provider would otherwise fall back to ANTHROPIC_API_KEY
        # from the environment, sending the built-in key to a named upstream without one.
        client = AsyncAnthropic(
            api_key=upstream.api_key or "", base_url=upstream.base_url, max_retries=0
        )
        return AnthropicModel(name, provider=AnthropicProvider(anthropic_client=client))
    return OpenAIChatModel(
        name,
        provider=OpenAIProvider(
            api_key=upstream.api_key or "not-set", base_url=upstream.openai_base_url
        ),
    )


def translate_model_error(exc: BaseException, *, upstream: Upstream, name: str) -> HaiaError:
    """Map a pydantic-ai/provider failure to HAIA's error types (the one place that does)."""
    server = f"The model's server ({upstream.name})"
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(exc, ModelTimeoutError | TimeoutError):
        return UpstreamTimeout(f"{server} did not answer within HAIA_LLM_TIMEOUT.")
    if isinstance(exc, ModelConnectionError):
        return Unavailable(
            f"{server} is unreachable; check {upstream.url_variable}.",
            retry_after=retry_after,
        )
    if isinstance(exc, ModelAPIError):
        return _translate_api_error(exc, server, upstream, f"{upstream.name}:{name}", retry_after)
    if isinstance(exc, UnexpectedModelBehavior):
        return UpstreamError(f"{server} sent an answer HAIA cannot use.")
    return HaiaError("The generation failed unexpectedly.")


def _translate_api_error(
    exc: ModelAPIError, server: str, upstream: Upstream, model_id: str, retry_after: float | None
) -> HaiaError:
    if isinstance(exc, ModelQuotaExceededError):
        return RateLimited(
            f"{server} says HAIA's account is out of quota or credit; "
            f"check the plan behind {upstream.key_variable}.",
            code="insufficient_quota",
        )
    if isinstance(exc, ModelRateLimitError):
        return RateLimited(f"{server} is rate limiting requests.", retry_after=retry_after)
    if isinstance(exc, ModelUnavailableError):
        return Unavailable(f"{server} is overloaded; try again shortly.", retry_after=retry_after)
    if isinstance(exc, ModelAuthenticationError):
        return Unauthorized(
            f"{server} rejected HAIA's credentials; check {upstream.key_variable}.",
            code="upstream_authentication_failed",
        )
    if isinstance(exc, ModelNotFoundError):
        return ModelNotFound(f"The model {model_id!r} does not exist on its server.")
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and 400 <= status < 500:
        return InvalidRequest(f"{server} rejected the request (status {status}).")
    return UpstreamError(f"{server} failed" + (f" (status {status})." if status else "."))


_THINKING = {
    "none": False,
    "minimal": "minimal",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "xhigh",
}


def request_settings(
    kind: str, options: dict[str, Any], settings: Settings
) -> tuple[ModelSettings, ModelRequestParameters]:
    """The model settings and request parameters for a job's `options` (see
    `ChatCompletionRequest.options`), translated for an upstream of `kind`."""
    values: dict[str, Any] = {
        "timeout": settings.llm_timeout,
        "max_retries": 0,
        **options.get("sampling", {}),
    }
    if "parallel_tool_calls" in options:
        values["parallel_tool_calls"] = options["parallel_tool_calls"]
    choice = options.get("tool_choice")
    if choice is not None:
        values["tool_choice"] = [choice["name"]] if isinstance(choice, dict) else choice
    effort = options.get("reasoning_effort")
    user = options.get("user")
    if kind == "anthropic":
        if effort is not None:
            values["thinking"] = _THINKING[effort]  # pydantic-ai turns it into a budget
        values.pop("logit_bias", None)  # not an Anthropic parameter
        values.pop("presence_penalty", None)
        values.pop("frequency_penalty", None)
        values.pop("seed", None)
        if user:
            values["anthropic_metadata"] = {"user_id": user}
    else:
        if effort is not None:
            values["openai_reasoning_effort"] = effort  # as the client sent it
        if user:
            values["openai_user"] = user
        if "response_format" in options:
            values["extra_body"] = {"response_format": options["response_format"]}
    tools = [
        ToolDefinition(
            name=tool["name"],
            description=tool.get("description"),
            parameters_json_schema=tool.get("parameters") or {"type": "object", "properties": {}},
            strict=tool.get("strict"),
        )
        for tool in options.get("tools", [])
    ]
    return (
        cast(ModelSettings, values),
        ModelRequestParameters(function_tools=tools, allow_text_output=True),
    )


def model_messages(
    rows: Sequence[ContextRow],
    *,
    blobs: dict[str, Blob],
    provider: str,
    instructions: str | None = HOMELAB_ASSISTANT_PROMPT,
) -> list[ModelMessage]:
    """Stored rows as pydantic-ai messages, the last request carrying the instructions
    (HAIA's homelab prompt unless the turn brings its own, or none)."""
    messages = to_model_messages(rows, blobs=blobs, provider=provider)
    last = messages[-1]
    if instructions and isinstance(last, ModelRequest):
        messages[-1] = ModelRequest(parts=last.parts, instructions=instructions)
    elif instructions:
        messages.append(ModelRequest(parts=[], instructions=instructions))
    return messages


def to_model_messages(
    rows: Sequence[ContextRow], *, blobs: dict[str, Blob], provider: str
) -> list[ModelMessage]:
    """Stored rows as pydantic-ai messages; consecutive request parts share one request."""
    messages: list[ModelMessage] = []
    tool_names: dict[str, str] = {}
    pending: list[ModelRequestPart] = []
    for row in rows:
        if row.role == "assistant":
            if pending:
                messages.append(ModelRequest(parts=pending))
                pending = []
            messages.append(_response(row, provider, tool_names))
        elif row.role == "system":
            pending.append(SystemPromptPart(content=row.content))
        elif row.role == "tool":
            call_id = row.tool_call_id or ""
            pending.append(
                ToolReturnPart(
                    tool_name=tool_names.get(call_id, "tool"),
                    content=row.content,
                    tool_call_id=call_id,
                )
            )
        else:
            pending.append(UserPromptPart(content=_user_content(row, blobs)))
    if pending:
        messages.append(ModelRequest(parts=pending))
    return messages


def _user_content(row: ContextRow, blobs: dict[str, Blob]) -> str | list[UserContent]:
    if not row.parts:
        return row.content
    content: list[UserContent] = []
    for part in row.parts:
        if part.get("type") == "text":
            content.append(str(part.get("text") or ""))
            continue
        image: dict[str, Any] = part["image_url"]  # type: ignore[assignment]
        url = str(image["url"])
        if url.startswith(BLOB_SCHEME):
            blob = blobs.get(url.removeprefix(BLOB_SCHEME))
            if blob is not None:
                content.append(BinaryContent(data=bytes(blob.data), media_type=blob.media_type))
        else:
            content.append(ImageUrl(url=url))
    return content


def _response(row: ContextRow, provider: str, tool_names: dict[str, str]) -> ModelResponse:
    parts: list[ModelResponsePart] = []
    if provider == "anthropic":
        for thinking in row.reasoning_parts or ():
            if thinking.get("provider_name") == "anthropic" and thinking.get("signature"):
                parts.append(
                    ThinkingPart(
                        content=str(thinking.get("content") or ""),
                        id=thinking.get("id"),  # type: ignore[arg-type]
                        signature=str(thinking["signature"]),
                        provider_name="anthropic",
                    )
                )
    if row.content:
        parts.append(TextPart(content=row.content))
    for call in row.tool_calls or ():
        function: dict[str, Any] = call["function"]  # type: ignore[assignment]
        call_id = str(call["id"])
        tool_names[call_id] = str(function["name"])
        parts.append(
            ToolCallPart(
                tool_name=str(function["name"]),
                args=str(function.get("arguments") or "{}"),
                tool_call_id=call_id,
            )
        )
    return ModelResponse(parts=parts)


def to_model_message(role: str, text: str) -> ModelMessage:
    """One plain-text message as pydantic-ai sees it (background tasks)."""
    if role == "assistant":
        return ModelResponse(parts=[TextPart(content=text)])
    if role == "system":
        return ModelRequest(parts=[SystemPromptPart(content=text)])
    return ModelRequest(parts=[UserPromptPart(content=text)])


def model_for(cache: dict[str, Any], upstream: Upstream, name: str) -> Model:
    model_id = f"{upstream.name}:{name}"
    if model_id not in cache:
        cache[model_id] = build_model(upstream, name)
    return cast(Model, cache[model_id])


async def stream(
    cache: dict[str, Any],
    settings: Settings,
    upstream: Upstream,
    name: str,
    messages: list[ModelMessage],
    options: dict[str, Any],
    sink: Any,
) -> dict[str, Any]:
    """Stream one response of `name` on `upstream` into `sink`; pydantic-ai's errors come out
    as HAIA's (transient ones as `Transient`). Returns usage, finish reason and signed
    thinking."""
    try:
        return await _request(
            model_for(cache, upstream, name), upstream.kind, settings, messages, options, sink
        )
    except HaiaError:
        raise
    except _TRANSIENT as exc:
        error = translate_model_error(exc, upstream=upstream, name=name)
        if isinstance(exc, ModelRateLimitError) and getattr(exc, "retry_after", None) is None:
            raise error from exc  # e.g. a spend limit: waiting will not help
        raise Transient(error) from exc
    except Exception as exc:
        raise translate_model_error(exc, upstream=upstream, name=name) from exc


_TRANSIENT = (ModelRateLimitError, ModelUnavailableError, ModelConnectionError)


async def _request(
    model: Model,
    kind: str,
    settings: Settings,
    messages: list[ModelMessage],
    options: dict[str, Any],
    sink: Any,
) -> dict[str, Any]:
    model_settings, parameters = request_settings(kind, options, settings)
    calls: dict[int, int] = {}  # response part index -> tool call index
    async with model_request_stream(
        model,
        messages,
        model_settings=model_settings,
        model_request_parameters=parameters,
    ) as stream:
        async for event in stream:
            if isinstance(event, PartDeltaEvent):
                _forward_delta(event.index, event.delta, sink, calls)
            elif isinstance(event, PartStartEvent):
                _forward_start(event.index, event.part, sink, calls)
        response = stream.get()
    finish_reason = response.finish_reason or "stop"
    thinking = [
        {
            "content": part.content,
            "id": part.id,
            "signature": part.signature,
            "provider_name": part.provider_name,
        }
        for part in response.parts
        if isinstance(part, ThinkingPart) and part.signature
    ]
    if calls and finish_reason == "stop":
        finish_reason = "tool_call"
    return {
        "prompt_tokens": response.usage.input_tokens,
        "completion_tokens": response.usage.output_tokens,
        "finish_reason": finish_reason,
        "reasoning_parts": thinking or None,
    }


def _forward_start(index: int, part: Any, sink: Any, calls: dict[int, int]) -> None:
    if isinstance(part, TextPart):
        if part.content:
            sink.delta(part.content)
    elif isinstance(part, ThinkingPart):
        if part.content:
            sink.reasoning(part.content)
    elif isinstance(part, ToolCallPart):
        calls[index] = len(calls)
        # Anthropic opens a tool_use block with `input: {}` and streams the JSON after it.
        args = (
            part.args if isinstance(part.args, str) else json.dumps(part.args) if part.args else ""
        )
        sink.tool(
            {
                "index": calls[index],
                "id": part.tool_call_id,
                "name": part.tool_name,
                "arguments": args,
            }
        )


def _forward_delta(index: int, delta: Any, sink: Any, calls: dict[int, int]) -> None:
    if isinstance(delta, TextPartDelta):
        if delta.content_delta:
            sink.delta(delta.content_delta)
    elif isinstance(delta, ThinkingPartDelta):
        if delta.content_delta:
            sink.reasoning(delta.content_delta)
    elif isinstance(delta, ToolCallPartDelta) and index in calls:
        args = delta.args_delta
        if isinstance(args, dict):
            args = json.dumps(args)
        if args:
            sink.tool({"index": calls[index], "arguments": args})


def plain_messages(messages: Sequence[tuple[str, str]]) -> list[ModelMessage]:
    """A background task's (role, text) messages, as sent (tasks bring their own
    instructions)."""
    *history, (_, prompt) = messages
    return [
        *(to_model_message(role, text) for role, text in history),
        ModelRequest(parts=[UserPromptPart(content=prompt)]),
    ]
