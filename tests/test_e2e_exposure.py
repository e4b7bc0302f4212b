"""Exposure (issue 12): what HAIA says about itself, and to whom.

`/health` without a key says only up or down; it never probes the upstream more than once per
interval however hard it is asked; HAIA warns loudly when it listens beyond loopback without
keys, and refuses a placeholder key copied from an example.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.procs import Stack, spawn_procfile

pytestmark = pytest.mark.e2e

KEY = "sk-exposure-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class CountingUpstream:
    """An "Ollama" that fails every request and counts them."""

    url: str
    requests: int = 0


@pytest.fixture
async def failing_upstream() -> AsyncIterator[CountingUpstream]:
    upstream = CountingUpstream(url="")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                upstream.requests += 1
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                body = b'{"error": "down"}'
                writer.write(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream.url = f"http://127.0.0.1:{port}/v1"
    yield upstream
    server.close()


async def test_health_probes_the_upstream_once_per_interval_and_hides_details(
    make_stack: Callable[..., Stack], failing_upstream: CountingUpstream
) -> None:
    # No HAIA_MODEL: the upstream is asked which models it has (and fails every time).
    stack = make_stack(
        HAIA_MODEL="", HAIA_API_KEYS=KEY, OLLAMA_BASE_URL=failing_upstream.url, HAIA_MODELS=""
    )
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.to_thread(stack.start_web)  # asks /health until it answers: probes once
    await asyncio.to_thread(stack.start_worker, False)
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(10):
            answers = await asyncio.gather(
                *(
                    http.get(f"{stack.base_url}/health", headers=AUTH if i % 2 else {})
                    for i in range(20)
                )
            )
            assert {answer.status_code for answer in answers} <= {200, 503}
        probes = failing_upstream.requests
        intervals = int((loop.time() - began) // 10) + 1
        # 200 requests; at most one probe per 10 s interval (plus one at an interval's edge).
        assert 1 <= probes <= intervals + 1, (probes, intervals)

        terse = (await http.get(f"{stack.base_url}/health")).json()
        assert terse["auth"] == "on"
        assert all(set(check) == {"status"} for check in terse["checks"].values()), terse
        assert terse["checks"]["upstream"]["status"] == "unreachable"
        detailed = (await http.get(f"{stack.base_url}/health", headers=AUTH)).json()
        assert failing_upstream.url in detailed["checks"]["upstream"]["detail"]
        assert "ids" in detailed["checks"]["workers"]
        for answer in answers:
            if "authorization" not in answer.request.headers:
                assert failing_upstream.url.split("/v1")[0] not in answer.text


@pytest.mark.parametrize(
    ("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False), ("localhost", False)]
)
def test_listening_beyond_loopback_without_keys_is_loud(
    make_stack: Callable[..., Stack], host: str, warned: bool
) -> None:
    stack = make_stack(HAIA_HOST=host)
    web = stack.start_web()
    health = httpx.get(f"{stack.base_url}/health").json()
    assert health["auth"] == "off"
    assert ("NO API KEYS" in web.log()) is warned, web.log()[-3000:]
    if warned:
        assert "secrets.token_urlsafe" in web.log()


def test_keys_silence_the_warning(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(HAIA_HOST="0.0.0.0", HAIA_API_KEYS=KEY)
    web = stack.start_web()
    assert httpx.get(f"{stack.base_url}/health").json()["auth"] == "on"
    assert "NO API KEYS" not in web.log()


@pytest.mark.parametrize("placeholder", ["change-me", "replace-me", "CHANGE_ME"])
def test_a_placeholder_key_stops_start_up(
    make_stack: Callable[..., Stack], log_dir: Path, placeholder: str
) -> None:
    stack = make_stack(HAIA_API_KEYS=f"{KEY},{placeholder}")
    web = spawn_procfile("web", stack.env, log_dir)
    try:
        assert web.process.wait(60) != 0
    finally:
        web.stop()
    assert "HAIA_API_KEYS" in web.log() and "token_urlsafe" in web.log()
