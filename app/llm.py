"""The seam between HAIA and the LLM providers: asking an upstream which models it offers.

Light on purpose: web and worker import it, and neither should load pydantic-ai's provider
modules (about 80 MB per process) unless an Anthropic model is used; that part lives in
`workers.pydantic_model`, imported when needed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

from app.http1 import MAX_BODY, ConnectionClosed, ProtocolError, SSEClient, TooLarge, proxy_for
from app.upstreams import Upstream

ANTHROPIC_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
MAX_PAGES = 10


def secret(value: object) -> str | None:
    get = getattr(value, "get_secret_value", None)
    return get() if get is not None else None


class Refused(Exception):
    """The upstream answered a model list request with a status other than 200."""

    def __init__(self, status: int) -> None:
        super().__init__(f"status {status}")
        self.status = status


Unanswered = (Refused, ValueError, TimeoutError, OSError, ConnectionClosed, ProtocolError)
"""What `discover` raises when an upstream does not answer, or answers badly (ValueError:
not a model list; OSError: unreachable; the others: a broken answer)."""


async def discover(upstream: Upstream, client: SSEClient, *, wait: float) -> list[str]:
    """The models `upstream` offers, as HAIA ids (`name:model`), in the order it lists them.

    Ollama and OpenAI-compatible servers: `GET <base_url>/models`; Anthropic: its models API
    (`GET /v1/models`, paged). Each GET waits at most `wait` seconds. Raises one of
    `Unanswered` when the upstream does not answer, or answers badly.
    """
    if upstream.kind == "anthropic":
        names = await _anthropic_models(upstream, client, wait)
    else:
        headers = {"Authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}
        url = f"{upstream.openai_base_url.rstrip('/')}/models"
        names = _ids(await _get_json(client, url, headers, wait))
    return [f"{upstream.name}:{name}" for name in names]


async def _anthropic_models(upstream: Upstream, client: SSEClient, wait: float) -> list[str]:
    url = f"{(upstream.base_url or ANTHROPIC_URL).rstrip('/')}/v1/models"
    headers = {"x-api-key": upstream.api_key or "", "anthropic-version": ANTHROPIC_VERSION}
    names: list[str] = []
    params: dict[str, str | int] = {"limit": 1000}
    for _ in range(MAX_PAGES):
        page = await _get_json(client, f"{url}?{urlencode(params)}", headers, wait)
        names += _ids(page)
        if not (isinstance(page, dict) and page.get("has_more") and page.get("last_id")):
            break
        params["after_id"] = str(page["last_id"])
    return names


async def _get_json(client: SSEClient, url: str, headers: dict[str, str], wait: float) -> Any:
    """GET `url` and decode its JSON; through the proxy of HTTP(S)_PROXY when one applies."""
    async with asyncio.timeout(wait):
        proxy = proxy_for(url)
        if proxy is None:
            answer = await client.get(url, headers)
            status, body = answer.status, answer.body
        else:
            status, body = await _get_proxied(url, headers, proxy)
    if status != 200:
        raise Refused(status)
    return json.loads(body)


async def _get_proxied(url: str, headers: dict[str, str], proxy: str) -> tuple[int, bytes]:
    """A GET through an HTTP(S) proxy, with aiohttp: imported only when a proxy is configured
    (the worker's proxied model requests use it too, see `workers.proxied`)."""
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(trust_env=False) as session,
            # No redirects, as without a proxy: aiohttp would follow one to another host with
            # the `x-api-key` header still on.
            session.get(url, headers=headers, proxy=proxy, allow_redirects=False) as response,
        ):
            body = await response.content.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise TooLarge(f"the answer is longer than {MAX_BODY} bytes")
            return response.status, body
    except aiohttp.ClientError as exc:
        if isinstance(exc, OSError):
            raise
        raise ConnectionClosed(str(exc)) from exc


def _ids(page: Any) -> list[str]:
    if not isinstance(page, dict) or not isinstance(page.get("data"), list):
        raise ValueError("not a model list")
    return [str(item["id"]) for item in page["data"] if isinstance(item, dict) and item.get("id")]
