"""The seam between HAIA and the LLM providers: model ids, upstream discovery and settings.

Light on purpose: web and worker import it, and neither should load pydantic-ai's provider
modules (about 80 MB per process) unless an Anthropic model is used; that part lives in
`workers.pydantic_model`, imported when needed.
"""

from __future__ import annotations

import httpx

from app.config import Settings, check_model_id


def split_model_id(model_id: str) -> tuple[str, str]:
    """`ollama:llama3.2:latest` → (`ollama`, `llama3.2:latest`)."""
    provider, _, name = check_model_id(model_id).partition(":")
    return provider, name


def secret(value: object) -> str | None:
    get = getattr(value, "get_secret_value", None)
    return get() if get is not None else None


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


BASE_URL_VARIABLES = {
    "ollama": "OLLAMA_BASE_URL",
    "anthropic": "ANTHROPIC_BASE_URL",
    "openai-chat": "OPENAI_BASE_URL",
}


def openai_endpoint(provider: str, settings: Settings) -> tuple[str, str | None]:
    """(base URL, API key) of an OpenAI-compatible provider (`ollama`, `openai-chat`)."""
    if provider == "ollama":
        return settings.ollama_base_url, None
    return (
        settings.openai_base_url or "https://api.openai.com/v1",
        secret(settings.openai_api_key),
    )
