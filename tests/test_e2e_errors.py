"""Every failure gets an OpenAI-shaped answer with the right status, provoked for real."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from tests import dbcheck
from tests.procs import Stack
from tests.sse import read_all

pytestmark = pytest.mark.e2e

SECRET = "sk-test-not-a-real-key"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def chat_body(content: str, *, stream: bool = False, model: str = "ollama:fake-model") -> dict:  # type: ignore[type-arg]
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]}


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and SECRET not in response.text
    assert response.headers.get("x-request-id")
    return dict(error)


@pytest.mark.parametrize(
    ("directive", "status", "code"),
    [
        ("status=401", 401, "upstream_authentication_failed"),
        ("status=404", 404, "model_not_found"),
        ("status=429", 429, "rate_limit_exceeded"),
        ("status=500", 502, "upstream_error"),
        ("status=503", 503, "service_unavailable"),
        ("status=529", 503, "service_unavailable"),
        ("garbage", 502, "upstream_error"),
    ],
)
async def test_upstream_failures_map_to_statuses(
    stack: Stack, http: httpx.AsyncClient, directive: str, status: int, code: str
) -> None:
    for stream in (False, True):
        body = chat_body(f"#fake {directive} n{stream}", stream=stream)
        response = await http.post(f"{stack.base_url}/v1/chat/completions", json=body)
        error = assert_openai_error(response, status)
        assert error["code"] == code
    if status == 401:
        assert "OLLAMA_BASE_URL" in str(error["message"])


async def test_rate_limit_passes_retry_after_on(stack: Stack, http: httpx.AsyncClient) -> None:
    body = chat_body("#fake status=429 retry_after=60")  # longer than HAIA waits itself
    response = await http.post(f"{stack.base_url}/v1/chat/completions", json=body)
    assert_openai_error(response, 429)
    assert response.headers["retry-after"] == "60"


async def test_transient_failures_are_retried_before_the_first_token(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    await stack.forget_upstream_requests()
    body = chat_body("#fake status=503 fail=2 tokens=3", stream=True)
    async with http.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        frames = await read_all(r)
    assert frames[-1].data == "[DONE]"
    assert len(await stack.upstream_requests()) == 3  # two failures, then the answer


async def test_spend_limit_429_is_not_retried(stack: Stack, http: httpx.AsyncClient) -> None:
    await stack.forget_upstream_requests()
    response = await http.post(
        f"{stack.base_url}/v1/chat/completions", json=chat_body("#fake status=429 once")
    )
    assert_openai_error(response, 429)
    assert len(await stack.upstream_requests()) == 1


async def test_mid_stream_failure_sends_an_error_chunk_and_done(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    await stack.forget_upstream_requests()
    body = chat_body("#fake tokens=20 cut=5", stream=True)
    async with http.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        frames = await read_all(r)
    assert frames[-1].data == "[DONE]"
    error = json.loads(str(frames[-2].data))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    contents = [
        json.loads(str(f.data))["choices"][0]["delta"].get("content")
        for f in frames[1:-2]
        if f.data
    ]
    assert "".join(c or "" for c in contents) == "tok0 tok1 tok2 tok3 tok4 "
    assert len(await stack.upstream_requests()) == 1  # never retried once text was sent
    completion_id = json.loads(str(frames[0].data))["id"]
    row = await dbcheck.message_by_completion(stack.database_url, completion_id)
    assert row["status"] == "failed"
    assert row["content"] == "tok0 tok1 tok2 tok3 tok4 "
    assert row["error"]


async def test_sdk_sees_typed_errors(stack: Stack) -> None:
    async with AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0) as sdk:
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(
                model="ollama:fake-model",
                messages=[{"role": "user", "content": "#fake status=429 sdk"}],
            )
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk.chat.completions.create(
                model="ollama:fake-model",
                messages=[{"role": "user", "content": "#fake status=500 sdk"}],
            )
        assert caught.value.status_code == 502


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nothing-here", 404),
        ("PUT", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
    ],
)
async def test_unknown_routes_and_methods(
    stack: Stack, http: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    assert_openai_error(await http.request(method, f"{stack.base_url}{path}"), status)


@pytest.mark.parametrize(
    ("content", "headers", "param"),
    [
        (b'{"messages": [', {"content-type": "application/json"}, None),
        (b'{"messages": "hi"}', {"content-type": "application/json"}, "messages"),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
            {"content-type": "application/json"},
            "temperature",
        ),
        (
            b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
            {"content-type": "application/json"},
            None,
        ),
        (b"messages=hi", {"content-type": "application/x-www-form-urlencoded"}, None),
        (b"[1, 2]", {"content-type": "application/json"}, None),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
            {"content-type": "application/json"},
            "max_tokens",
        ),
    ],
)
async def test_bad_input_is_400(
    stack: Stack,
    http: httpx.AsyncClient,
    content: bytes,
    headers: dict[str, str],
    param: str | None,
) -> None:
    response = await http.post(
        f"{stack.base_url}/v1/chat/completions", content=content, headers=headers
    )
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


async def test_oversized_body_is_413(stack: Stack) -> None:
    """A 20 MB body is refused from its headers, before it is read."""
    port = int(stack.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {20 * 1024 * 1024}\r\n\r\n".encode()
        + b'{"messages": [{"role": "user", "content": "'
        + b"x" * 65536
    )
    await writer.drain()
    head, body = await read_response(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


async def test_request_ids_are_accepted_or_generated(stack: Stack, http: httpx.AsyncClient) -> None:
    given = await http.post(
        f"{stack.base_url}/v1/chat/completions",
        json=chat_body("with an id"),
        headers={"X-Request-ID": "my-req-1"},
    )
    assert given.headers["x-request-id"] == "my-req-1"
    bad = await http.get(f"{stack.base_url}/v1/models", headers={"X-Request-ID": "bad id\x7f"})
    assert bad.headers["x-request-id"] != "bad id\x7f" and len(bad.headers["x-request-id"]) == 32
    body = chat_body("streamed with an id", stream=True)
    async with http.stream(
        "POST",
        f"{stack.base_url}/v1/chat/completions",
        json=body,
        headers={"X-Request-ID": "my-req-2"},
    ) as r:
        assert r.headers["x-request-id"] == "my-req-2"
        await r.aread()
    await asyncio.sleep(0.3)
    logs = stack.logs()
    worker_lines = [
        json.loads(line)
        for line in logs.splitlines()
        if line.startswith("{") and '"my-req-2"' in line
    ]
    assert {line["process"] for line in worker_lines} == {"worker"} or worker_lines
    assert any(line["process"] == "worker" for line in worker_lines)
    assert SECRET not in logs


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length: (head, body)."""
    async with asyncio.timeout(20):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return head.rstrip(), await reader.readexactly(length)


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_upstream_is_503(
    make_stack: Callable[..., Stack], http: httpx.AsyncClient
) -> None:
    stack = make_stack(
        OLLAMA_BASE_URL=f"http://127.0.0.1:{_unused_port()}/v1", HAIA_LLM_RETRIES="1"
    )
    stack.start_web()
    stack.start_worker()
    response = await http.post(f"{stack.base_url}/v1/chat/completions", json=chat_body("hi"))
    error = assert_openai_error(response, 503)
    assert "unreachable" in str(error["message"]) and "OLLAMA_BASE_URL" in str(error["message"])


async def test_silent_upstream_is_504(
    make_stack: Callable[..., Stack], http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_LLM_TIMEOUT="1")
    stack.start_web()
    stack.start_worker()
    response = await http.post(
        f"{stack.base_url}/v1/chat/completions", json=chat_body("#fake hang")
    )
    error = assert_openai_error(response, 504)
    assert error["code"] == "upstream_timeout"


async def test_no_worker_is_503_not_a_hang(
    make_stack: Callable[..., Stack], http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_QUEUE_TIMEOUT="1", HAIA_KEEPALIVE_INTERVAL="0.2")
    stack.start_web()
    for stream in (False, True):
        response = await http.post(
            f"{stack.base_url}/v1/chat/completions", json=chat_body("anyone?", stream=stream)
        )
        error = assert_openai_error(response, 503)
        assert error["code"] == "no_worker"
    rows = await dbcheck.query(
        stack.database_url,
        "SELECT status FROM haia_message WHERE role = 'assistant' AND error IS NOT NULL "
        "AND content = '' ORDER BY id DESC LIMIT 2",
    )
    assert [r["status"] for r in rows] == ["failed", "failed"]


async def test_slow_body_within_the_timeout_is_served_and_a_stalled_one_is_408(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(HAIA_REQUEST_TIMEOUT="2")
    stack.start_web()
    stack.start_worker()
    port = int(stack.base_url.rsplit(":", 1)[1])
    body = json.dumps(chat_body("slowly")).encode()

    async def send(pieces: list[bytes], pause: float) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(pause)
        head, answer = await read_response(reader)
        writer.close()
        return head + b"\r\n\r\n" + answer

    slow = await send([body[i : i + 10] for i in range(0, len(body), 10)], 0.05)
    assert slow.startswith(b"HTTP/1.1 200"), slow[:200]
    stalled = await send([body[:10]], 0)
    assert stalled.startswith(b"HTTP/1.1 408"), stalled[:200]
    assert b'"request_timeout"' in stalled


async def test_database_down_is_503_and_nothing_half_stored(
    make_stack: Callable[..., Stack], http: httpx.AsyncClient, database_url: str
) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite is a file inside the process: there is no server to stop")
    from tests.proxy import database_behind_proxy

    proxy, through_proxy = await database_behind_proxy(database_url)
    stack = make_stack(HAIA_DATABASE_URL=through_proxy)
    try:
        # Started from a thread: this loop must keep serving the proxy meanwhile.
        await asyncio.to_thread(stack.start_web)
        await asyncio.to_thread(stack.start_worker)
        url = f"{stack.base_url}/v1/chat/completions"
        assert (await http.post(url, json=chat_body("before the outage"))).status_code == 200
        await proxy.stop()
        down = await http.post(url, json=chat_body("during the outage"))
        error = assert_openai_error(down, 503)
        assert error["code"] == "storage_unavailable"
        health = await http.get(f"{stack.base_url}/health")
        assert health.status_code == 503
        assert health.json()["checks"]["database"]["status"] == "down"
        await proxy.start()
        async with asyncio.timeout(30):
            while (await http.get(f"{stack.base_url}/health")).status_code != 200:
                await asyncio.sleep(0.2)
        again = await http.post(url, json=chat_body("after the outage"))
        assert again.status_code == 200, again.text
    finally:
        stack.stop()
        await proxy.stop()
    rows = await dbcheck.query(
        database_url,
        "SELECT COUNT(*) AS n FROM haia_message WHERE content = $1",
        "during the outage",
    )
    assert rows[0]["n"] == 0


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v1/conversations?limit=%C2%B2", {}),  # '²' passes str.isdigit() and fails int()
        ("/v1/chat/completions/chatcmpl-unknown/stream?starting_after=%C2%B2", {}),
        ("/v1/chat/completions/chatcmpl-unknown/stream", {"Last-Event-ID": "\u0663"}),
    ],
)
async def test_unicode_digits_are_a_400_not_a_500(
    stack: Stack, http: httpx.AsyncClient, path: str, headers: dict[str, str]
) -> None:
    response = await http.get(
        f"{stack.base_url}{path}",
        headers={k.encode(): v.encode() for k, v in headers.items()},  # raw UTF-8 bytes
    )
    assert response.status_code in (400, 404), response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
