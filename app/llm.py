"""The seam between HAIA and the LLM providers: model ids in, pydantic-ai models out."""

from __future__ import annotations

from typing import Any, cast

import httpx
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
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.models.anthropic import AnthropicModel
from pydantic_ai.models.ollama import OllamaModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.anthropic import AnthropicProvider
from pydantic_ai.providers.ollama import OllamaProvider
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import ToolDefinition

from app.config import Settings, check_model_id
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


def split_model_id(model_id: str) -> tuple[str, str]:
    """`ollama:llama3.2:latest` → (`ollama`, `llama3.2:latest`)."""
    provider, _, name = check_model_id(model_id).partition(":")
    return provider, name


def _secret(value: object) -> str | None:
    get = getattr(value, "get_secret_value", None)
    return get() if get is not None else None


def build_model(model_id: str, settings: Settings) -> Model:
    """A pydantic-ai model for `model_id`, wired to the provider settings."""
    provider, name = split_model_id(model_id)
    if provider == "ollama":
        return OllamaModel(name, provider=OllamaProvider(base_url=settings.ollama_base_url))
    if provider == "anthropic":
        return AnthropicModel(
            name,
            provider=AnthropicProvider(
                api_key=_secret(settings.anthropic_api_key) or "",
                base_url=settings.anthropic_base_url,
            ),
        )
    return OpenAIChatModel(
        name,
        provider=OpenAIProvider(
            api_key=_secret(settings.openai_api_key) or "not-set",
            base_url=settings.openai_base_url,
        ),
    )


async def discover_ollama_models(settings: Settings, client: httpx.AsyncClient) -> list[str]:
    """The models Ollama at OLLAMA_BASE_URL offers, as HAIA ids (`ollama:NAME`).

    Raises `httpx.HTTPError` when Ollama does not answer or answers badly.
    """
    response = await client.get(f"{settings.ollama_base_url.rstrip('/')}/models", timeout=3.0)
    response.raise_for_status()
    data = response.json().get("data", [])
    return [f"ollama:{item['id']}" for item in data if isinstance(item, dict) and item.get("id")]


CREDENTIAL_VARIABLES = {
    "ollama": "OLLAMA_BASE_URL",
    "anthropic": "ANTHROPIC_API_KEY",
    "openai-chat": "OPENAI_API_KEY",
}


def translate_model_error(exc: BaseException, *, model_id: str) -> HaiaError:
    """Map a pydantic-ai/provider failure to HAIA's error types (the one place that does)."""
    provider = model_id.partition(":")[0]
    server = f"The model's server ({provider})"
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(exc, ModelTimeoutError | TimeoutError):
        return UpstreamTimeout(f"{server} did not answer within HAIA_LLM_TIMEOUT.")
    if isinstance(exc, ModelConnectionError):
        return Unavailable(
            f"{server} is unreachable; check {BASE_URL_VARIABLES[provider]}.",
            retry_after=retry_after,
        )
    if isinstance(exc, ModelAPIError):
        return _translate_api_error(exc, server, provider, model_id, retry_after)
    if isinstance(exc, UnexpectedModelBehavior):
        return UpstreamError(f"{server} sent an answer HAIA cannot use.")
    return HaiaError("The generation failed unexpectedly.")


def _translate_api_error(
    exc: ModelAPIError, server: str, provider: str, model_id: str, retry_after: float | None
) -> HaiaError:
    if isinstance(exc, ModelQuotaExceededError):
        return RateLimited(
            f"{server} says HAIA's account is out of quota or credit; "
            f"check the plan behind {CREDENTIAL_VARIABLES[provider]}.",
            code="insufficient_quota",
        )
    if isinstance(exc, ModelRateLimitError):
        return RateLimited(f"{server} is rate limiting requests.", retry_after=retry_after)
    if isinstance(exc, ModelUnavailableError):
        return Unavailable(f"{server} is overloaded; try again shortly.", retry_after=retry_after)
    if isinstance(exc, ModelAuthenticationError):
        return Unauthorized(
            f"{server} rejected HAIA's credentials; check {CREDENTIAL_VARIABLES[provider]}.",
            code="upstream_authentication_failed",
        )
    if isinstance(exc, ModelNotFoundError):
        return ModelNotFound(f"The model {model_id!r} does not exist on its server.")
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and 400 <= status < 500:
        return InvalidRequest(f"{server} rejected the request (status {status}).")
    return UpstreamError(f"{server} failed" + (f" (status {status})." if status else "."))


BASE_URL_VARIABLES = {
    "ollama": "OLLAMA_BASE_URL",
    "anthropic": "ANTHROPIC_BASE_URL",
    "openai-chat": "OPENAI_BASE_URL",
}


_THINKING = {
    "none": False,
    "minimal": "minimal",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "xhigh",
}


def request_settings(
    model_id: str, options: dict[str, Any], settings: Settings
) -> tuple[ModelSettings, ModelRequestParameters]:
    """The model settings and request parameters for a job's `options` (see
    `ChatCompletionRequest.options`), translated for the model's provider."""
    provider = model_id.partition(":")[0]
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
    if provider == "anthropic":
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


def openai_endpoint(provider: str, settings: Settings) -> tuple[str, str | None]:
    """(base URL, API key) of an OpenAI-compatible provider (`ollama`, `openai-chat`)."""
    if provider == "ollama":
        return settings.ollama_base_url, None
    return (
        settings.openai_base_url or "https://api.openai.com/v1",
        _secret(settings.openai_api_key),
    )
