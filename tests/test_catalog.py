"""Model discovery never breaks the model list: whatever an upstream answers, the catalog
records why it has no models from it and goes on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from app.catalog import Catalog
from app.config import Settings
from app.http1 import SSEClient


async def _serving(answer: bytes) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


@pytest.fixture
async def client() -> AsyncIterator[SSEClient]:
    http = SSEClient(connect_timeout=2, read_timeout=2)
    yield http
    http.close()


def _answer(status: str, body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 " + status.encode() + b"\r\nContent-Length: %d\r\n" % len(body)
    return head + b"".join(extra) + b"Connection: close\r\n\r\n" + body


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (_answer("401 Unauthorized", b"{}"), "answered 401 to a model list"),
        (
            _answer("302 Found", b"", b"Location: http://example.invalid/\r\n"),
            "answered 302 to a model list",
        ),
        (_answer("200 OK", b"<html>not json</html>"), "is unreachable"),
        (_answer("200 OK", b"not gzip", b"Content-Encoding: gzip\r\n"), "is unreachable"),
        # json.loads raises RecursionError here, which no HTTP client names: still no crash.
        (_answer("200 OK", b"[" * 200_000), "is unreachable"),
    ],
    ids=["refused", "redirect", "not-json", "bad-gzip", "too-deep"],
)
async def test_a_bad_answer_leaves_the_upstream_out_and_says_why(
    answer: bytes, error: str, client: SSEClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, url = await _serving(answer)
    monkeypatch.setenv("OLLAMA_BASE_URL", url)
    monkeypatch.delenv("HAIA_MODEL", raising=False)
    try:
        catalog = Catalog(Settings(), client)
        await catalog.refresh()
        assert catalog.upstream_errors == [f"ollama at {url} {error}"]
        assert await catalog.models() == []
    finally:
        server.close()
        await server.wait_closed()
