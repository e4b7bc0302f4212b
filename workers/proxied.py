"""Requests to an upstream through an HTTP(S) proxy (`HTTP_PROXY`, `HTTPS_PROXY`), with aiohttp.

Imported only when a worker first sends such a request: aiohttp and its dependencies cost every
worker process about 5 MB of memory, and direct requests never use them (`app.http1`).
"""

from __future__ import annotations

from typing import Any

import aiohttp

from app.http1 import ConnectionClosed
from workers.openai_wire import Endpoint, _event, _outcome, _status_error


class ProxiedSession:
    """One aiohttp session for every proxied request of a worker."""

    def __init__(self, *, timeout: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
                # The proxy is looked up once per upstream (`proxy_for`): aiohttp's
                # trust_env would read ~/.netrc on every request.
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def stream(
        self,
        endpoint: Endpoint,
        url: str,
        body: dict[str, Any],
        headers: dict[str, str],
        proxy: str,
        sink: Any,
    ) -> dict[str, Any]:
        """As `OpenAIWire.stream`. A connection that fails is an `OSError` (aiohttp's
        connector errors are); one that breaks later is `ConnectionClosed`."""
        try:
            # No redirects, as without a proxy: aiohttp would follow one to another host with
            # an Anthropic-style key header still on.
            async with self._client().post(
                url, json=body, headers=headers, proxy=proxy, allow_redirects=False
            ) as response:
                if response.status != 200:
                    raw = await response.read()
                    raise _status_error(endpoint, body, response.status, response.headers, raw)
                return await _read(endpoint, response, sink)
        except aiohttp.ClientError as exc:
            if isinstance(exc, OSError):
                raise
            raise ConnectionClosed(str(exc)) from exc


async def _read(endpoint: Endpoint, response: aiohttp.ClientResponse, sink: Any) -> dict[str, Any]:
    state: dict[str, Any] = {"finish_reason": None, "usage": None}
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data:") and _event(endpoint, line[5:].strip(), sink, state):
                return _outcome(endpoint, state, done=True)
    return _outcome(endpoint, state, done=False)
