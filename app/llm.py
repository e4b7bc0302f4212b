"""The seam between HAIA and the LLM providers: model ids in, pydantic-ai models out."""

from __future__ import annotations

import httpx
from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelAuthenticationError,
    ModelConnectionError,
    ModelNotFoundError,
    ModelRateLimitError,
    ModelTimeoutError,
    ModelUnavailableError,
    UnexpectedModelBehavior,
)
from pydantic_ai.models import Model
from pydantic_ai.models.anthropic import AnthropicModel
from pydantic_ai.models.ollama import OllamaModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.anthropic import AnthropicProvider
from pydantic_ai.providers.ollama import OllamaProvider
from pydantic_ai.providers.openai import OpenAIProvider

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


_CREDENTIAL_VARIABLES = {
    "ollama": "OLLAMA_BASE_URL",
    "anthropic": "ANTHROPIC_API_KEY",
    "openai-chat": "OPENAI_API_KEY",
}


def translate_model_error(exc: BaseException, *, model_id: str) -> HaiaError:
    """Map a pydantic-ai/provider failure to HAIA's error types (the one place that does)."""
    provider = model_id.partition(":")[0]
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(exc, ModelTimeoutError | TimeoutError):
        return UpstreamTimeout(f"The model's server ({provider}) did not answer in time.")
    if isinstance(exc, ModelConnectionError):
        return Unavailable(
            f"The model's server ({provider}) is unreachable; check "
            f"{_BASE_URL_VARIABLES[provider]}.",
            retry_after=retry_after,
        )
    if isinstance(exc, ModelRateLimitError):
        return RateLimited(
            f"The model's server ({provider}) is rate limiting requests.", retry_after=retry_after
        )
    if isinstance(exc, ModelUnavailableError):
        return Unavailable(
            f"The model's server ({provider}) is overloaded; try again shortly.",
            retry_after=retry_after,
        )
    if isinstance(exc, ModelAuthenticationError):
        return Unauthorized(
            f"The model's server ({provider}) rejected HAIA's credentials; check "
            f"{_CREDENTIAL_VARIABLES[provider]}.",
            code="upstream_authentication_failed",
        )
    if isinstance(exc, ModelNotFoundError):
        return ModelNotFound(f"The model {model_id!r} does not exist on its server.")
    if isinstance(exc, ModelAPIError):
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and 400 <= status < 500:
            return InvalidRequest(f"The model's server ({provider}) rejected the request.")
        return UpstreamError(f"The model's server ({provider}) failed (status {status}).")
    if isinstance(exc, UnexpectedModelBehavior):
        return UpstreamError(f"The model's server ({provider}) sent an answer HAIA cannot use.")
    return HaiaError("The generation failed unexpectedly.")


_BASE_URL_VARIABLES = {
    "ollama": "OLLAMA_BASE_URL",
    "anthropic": "ANTHROPIC_BASE_URL",
    "openai-chat": "OPENAI_BASE_URL",
}
