"""The seam between HAIA and the LLM providers: asking an upstream which models it offers.

Light on purpose: web and worker import it, and neither should load pydantic-ai's provider
modules (about 80 MB per process) unless an Anthropic model is used; that part lives in
`workers.pydantic_model`, imported when needed.
"""

from __future__ import annotations

from typing import Any

import httpx

from app.upstreams import Upstream

ANTHROPIC_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
MAX_PAGES = 10


def secret(value: object) -> str | None:
    get = getattr(value, "get_secret_value", None)
    return get() if get is not None else None


async def discover(upstream: Upstream, client: httpx.AsyncClient, *, wait: float) -> list[str]:
    """The models `upstream` offers, as HAIA ids (`name:model`), in the order it lists them.

    Ollama and OpenAI-compatible servers: `GET <base_url>/models`; Anthropic: its models API
    (`GET /v1/models`, paged). Raises `httpx.HTTPError` or ValueError when the upstream does
    not answer, or answers badly.
    """
    if upstream.kind == "anthropic":
        names = await _anthropic_models(upstream, client, wait)
    else:
        headers = {"Authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}
        url = f"{upstream.openai_base_url.rstrip('/')}/models"
        response = await client.get(url, headers=headers, timeout=wait)
        response.raise_for_status()
        names = _ids(response.json())
    return [f"{upstream.name}:{name}" for name in names]


async def _anthropic_models(
    upstream: Upstream, client: httpx.AsyncClient, wait: float
) -> list[str]:
    url = f"{(upstream.base_url or ANTHROPIC_URL).rstrip('/')}/v1/models"
    headers = {"x-api-key": upstream.api_key or "", "anthropic-version": ANTHROPIC_VERSION}
    names: list[str] = []
    params: dict[str, str | int] = {"limit": 1000}
    for _ in range(MAX_PAGES):
        response = await client.get(url, headers=headers, params=params, timeout=wait)
        response.raise_for_status()
        page = response.json()
        names += _ids(page)
        if not (isinstance(page, dict) and page.get("has_more") and page.get("last_id")):
            break
        params["after_id"] = str(page["last_id"])
    return names


def _ids(page: Any) -> list[str]:
    if not isinstance(page, dict) or not isinstance(page.get("data"), list):
        raise ValueError("not a model list")
    return [str(item["id"]) for item in page["data"] if isinstance(item, dict) and item.get("id")]
