"""The worker honours HTTP(S)_PROXY and NO_PROXY for upstream requests, as the SDKs do,
looking them up once per URL (aiohttp's own `trust_env` re-read ~/.netrc on every request),
and streams through a real forward proxy to the fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import pytest

from app.errors import HaiaError
from app.http1 import SSEClient, proxy_for
from app.llm import Refused, discover
from app.upstreams import Upstream
from tests.procs import free_port
from workers.openai_wire import Endpoint, OpenAIWire, Transient


@pytest.fixture(autouse=True)
def fresh_lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxy_for.cache_clear()
    yield
    proxy_for.cache_clear()


def test_no_proxy_variables_means_a_direct_connection() -> None:
    assert proxy_for("http://10.0.0.5:11434/v1/chat/completions") is None


def test_the_scheme_picks_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://plain-proxy:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://tls-proxy:3128")
    assert proxy_for("http://10.0.0.5:11434/v1/chat/completions") == "http://plain-proxy:3128"
    assert proxy_for("https://api.openai.com/v1/chat/completions") == "http://tls-proxy:3128"


def test_no_proxy_bypasses_listed_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://plain-proxy:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1,.lan")
    assert proxy_for("http://127.0.0.1:11434/v1/chat/completions") is None
    assert proxy_for("http://gpubox.lan:11434/v1/chat/completions") is None
    assert proxy_for("http://10.0.0.5:11434/v1/chat/completions") == "http://plain-proxy:3128"


class _Sink:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning_text: list[str] = []
        self.pieces: list[dict[str, object]] = []

    def delta(self, text: str) -> None:
        self.text.append(text)

    def reasoning(self, text: str) -> None:
        self.reasoning_text.append(text)

    def tool(self, piece: dict[str, object]) -> None:
        self.pieces.append(piece)


class _ForwardProxy:
    """A plain HTTP forward proxy, as squid is to a worker: it takes absolute-form requests
    (`POST http://host:port/path HTTP/1.1`), sends them on to that host, and pipes the answer
    back. It records the request lines it saw, and can refuse everything (a broken proxy)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.refuse = False
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Close the listener and every connection still open (a client's idle keep-alive
        one included): nothing is left for the event loop's teardown."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, version = head.split(b"\r\n", 1)[0].decode().split(" ")
            self.seen.append(f"{method} {target}")
            if self.refuse:
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            url = urlsplit(target)
            upstream_reader, upstream_writer = await asyncio.open_connection(url.hostname, url.port)
            rest = head.split(b"\r\n", 1)[1]
            path = f"{url.path}?{url.query}" if url.query else url.path
            upstream_writer.write(f"{method} {path} {version}\r\n".encode() + rest)

            async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                while chunk := await source.read(65536):
                    sink.write(chunk)
                    await sink.drain()

            upload = asyncio.create_task(pipe(reader, upstream_writer))
            try:
                await pipe(upstream_reader, writer)
            finally:
                upload.cancel()
                await asyncio.gather(upload, return_exceptions=True)
                upstream_writer.close()
                with contextlib.suppress(Exception):
                    await upstream_writer.wait_closed()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._handlers.discard(handler)


@pytest.fixture
async def forward_proxy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[_ForwardProxy]:
    proxy = _ForwardProxy()
    monkeypatch.setenv("HTTP_PROXY", await proxy.start())
    yield proxy
    await proxy.stop()


def _anthropic(base_url: str) -> Upstream:
    return Upstream(
        name="anthropic",
        kind="anthropic",
        base_url=base_url,
        url_variable="ANTHROPIC_BASE_URL",
        api_key="sk-ant-test",
    )


def _endpoint(base_url: str) -> Endpoint:
    upstream = Upstream(
        name="ollama", kind="ollama", base_url=f"{base_url}/v1", url_variable="OLLAMA_BASE_URL"
    )
    return Endpoint(upstream)


async def test_a_proxied_upstream_streams_through_the_proxy(
    forward_proxy: _ForwardProxy, fake_upstream: str
) -> None:
    wire = OpenAIWire(timeout=10)
    sink = _Sink()
    try:
        body = {
            "model": "fake-model",
            "stream": True,
            "messages": [{"role": "user", "content": "#fake tokens=5 think=2"}],
        }
        outcome = await wire.stream(_endpoint(fake_upstream), body, sink)
    finally:
        await wire.aclose()
    assert forward_proxy.seen == [f"POST {fake_upstream}/v1/chat/completions"]
    assert "".join(sink.text) == "tok0 tok1 tok2 tok3 tok4 "
    assert "".join(sink.reasoning_text) == "think0 think1 "
    assert outcome["finish_reason"] == "stop"


async def _refused(fake_upstream: str) -> BaseException:
    """What a short request through the configured proxy raises."""
    wire = OpenAIWire(timeout=10)
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        await wire.stream(_endpoint(fake_upstream), body, _Sink())
    except HaiaError as exc:
        return exc
    finally:
        await wire.aclose()
    raise AssertionError("the request went through")


async def test_a_proxy_that_refuses_is_the_upstreams_error(
    forward_proxy: _ForwardProxy, fake_upstream: str
) -> None:
    forward_proxy.refuse = True
    error = await _refused(fake_upstream)
    assert isinstance(error, HaiaError) and error.status >= 500  # OpenAI-shaped, not a crash


async def test_an_unreachable_proxy_is_an_unreachable_upstream(
    monkeypatch: pytest.MonkeyPatch, fake_upstream: str
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    error = await _refused(fake_upstream)
    assert isinstance(error, Transient) and "OLLAMA_BASE_URL" in error.error.message


async def test_model_lists_are_asked_through_the_proxy(
    forward_proxy: _ForwardProxy, fake_upstream: str
) -> None:
    """The web's model discovery honours the same variables: both list shapes go through the
    proxy, and the answer is the same as asked directly."""
    client = SSEClient(connect_timeout=5, read_timeout=5)
    ollama = _endpoint(fake_upstream).upstream
    anthropic = _anthropic(fake_upstream)
    try:
        assert await discover(ollama, client, wait=5) == ["ollama:fake-model"]
        assert await discover(anthropic, client, wait=5) == ["anthropic:claude-fake"]
    finally:
        client.close()
    assert forward_proxy.seen == [
        f"GET {fake_upstream}/v1/models",
        f"GET {fake_upstream}/v1/models?limit=1000",
    ]


async def test_a_model_list_refused_by_the_proxy_is_a_refused_list(
    forward_proxy: _ForwardProxy, fake_upstream: str
) -> None:
    forward_proxy.refuse = True
    client = SSEClient(connect_timeout=5, read_timeout=5)
    with pytest.raises(Refused) as refused:
        await discover(_endpoint(fake_upstream).upstream, client, wait=5)
    assert refused.value.status == 502


async def test_model_lists_without_a_proxy_go_straight_to_the_upstream(
    fake_upstream: str,
) -> None:
    client = SSEClient(connect_timeout=5, read_timeout=5)
    try:
        assert await discover(_endpoint(fake_upstream).upstream, client, wait=5) == [
            "ollama:fake-model"
        ]
        with pytest.raises(ConnectionRefusedError):  # nothing listens there
            await discover(_endpoint(f"http://127.0.0.1:{free_port()}").upstream, client, wait=5)
    finally:
        client.close()


async def test_a_redirect_through_the_proxy_is_not_followed(
    forward_proxy: _ForwardProxy,
) -> None:
    """An upstream that redirects its model list elsewhere is refused, as without a proxy:
    followed, the request would carry the upstream's key to the other host."""
    elsewhere: list[bytes] = []

    async def other(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        elsewhere.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"data":[]}')
        writer.close()

    async def redirecting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:%d/v1/models\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n" % other_port
        )
        writer.close()

    other_server = await asyncio.start_server(other, "127.0.0.1", 0)
    other_port = other_server.sockets[0].getsockname()[1]
    redirect_server = await asyncio.start_server(redirecting, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{redirect_server.sockets[0].getsockname()[1]}"
    anthropic = _anthropic(base)
    client = SSEClient(connect_timeout=5, read_timeout=5)
    try:
        with pytest.raises(Refused) as refused:
            await discover(anthropic, client, wait=5)
    finally:
        client.close()
        for server in (other_server, redirect_server):
            server.close()
            await server.wait_closed()
    assert refused.value.status == 302
    assert forward_proxy.seen == [f"GET {base}/v1/models?limit=1000"]
    assert elsewhere == []
