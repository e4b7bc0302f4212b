"""Limits per owner: a client cannot queue without bound or send without bound (issue 12)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import redis.asyncio as aioredis

from app import keys
from tests import dbcheck
from tests.procs import Stack
from tests.sse import content_of, read_all
from tests.test_e2e_durability import start_stream

pytestmark = pytest.mark.e2e


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=30)) as client:
        yield client


def body(content: str, **extra: object) -> dict[str, object]:
    return {
        "model": "ollama:fake-model",
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


async def test_one_generation_too_many_is_a_429_with_retry_after(
    make_stack: Callable[..., Stack], http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_MAX_CONCURRENT_PER_OWNER="1")
    stack.start_web()
    stack.start_worker()
    url = f"{stack.base_url}/v1/chat/completions"
    first, _ = await start_stream(http, stack, "#fake tokens=60 delay=0.03", read=2)
    refused = await http.post(url, json=body("one more"))
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert int(refused.headers["retry-after"]) >= 1
    # Another owner is not held back by this one.
    other = await http.post(url, json=body("me too"), headers={"X-OpenWebUI-User-Id": "bob"})
    assert other.status_code == 200, other.text
    async with asyncio.timeout(20):  # once the first has ended, the next is served
        while (await http.get(f"{url}/{first}")).json()["status"] == "in_progress":
            await asyncio.sleep(0.1)
    assert (await http.post(url, json=body("now"))).status_code == 200


async def test_too_many_messages_is_a_400_naming_messages(
    make_stack: Callable[..., Stack], http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_MAX_MESSAGES="3")
    stack.start_web()
    messages = [{"role": "user", "content": f"m{i}"} for i in range(4)]
    response = await http.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": "ollama:fake-model", "messages": messages},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages"
    assert "HAIA_MAX_MESSAGES" in response.json()["error"]["message"]


# --- open streams per owner ---------------------------------------------------------------------

SLOW = "#fake tokens=600 delay=0.05"  # about 30 s of tokens: the streams stay open


async def open_stream(
    http: httpx.AsyncClient, base_url: str, content: str = SLOW, **headers: str
) -> httpx.Response:
    """POST a streaming chat and keep it open (headers read, body not); the caller closes it."""
    request = http.build_request(
        "POST",
        f"{base_url}/v1/chat/completions",
        json=body(content, stream=True),
        headers=headers,
    )
    return await http.send(request, stream=True)


def assert_stream_refused(response: httpx.Response, text: str) -> None:
    assert response.status_code == 429, text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "rate_limit_exceeded"
    assert "HAIA_MAX_STREAMS_PER_OWNER" in error["message"]
    assert int(response.headers["retry-after"]) >= 1


async def test_streams_per_owner_are_bounded_across_web_processes(
    make_stack: Callable[..., Stack], http: httpx.AsyncClient
) -> None:
    # Two web processes on one Redis and database; leases lapse after 4 keep-alive intervals
    # (4 s here), renewed every interval.
    env = {"HAIA_MAX_STREAMS_PER_OWNER": "2", "HAIA_KEEPALIVE_INTERVAL": "1"}
    one, two = make_stack(**env), make_stack(**env)
    two.env["HAIA_DATABASE_URL"] = one.env["HAIA_DATABASE_URL"]
    one.start_web()
    one.start_worker()
    two.start_web()
    first = await open_stream(http, one.base_url)
    second = await open_stream(http, two.base_url)
    assert (first.status_code, second.status_code) == (200, 200)
    [row] = await dbcheck.query(
        one.database_url,
        "SELECT completion_id FROM haia_message WHERE conversation_id = $1 AND role = $2",
        first.headers["x-conversation-id"],
        "assistant",
    )
    completion_id = row["completion_id"]

    refused = await open_stream(http, one.base_url, "one more")
    assert_stream_refused(refused, (await refused.aread()).decode())
    reattach = await http.get(f"{two.base_url}/v1/chat/completions/{completion_id}/stream")
    assert_stream_refused(reattach, reattach.text)
    # Nothing was stored for the refused request.
    stored = await dbcheck.query(
        one.database_url, "SELECT COUNT(*) AS n FROM haia_message WHERE content = $1", "one more"
    )
    assert stored[0]["n"] == 0
    # Another owner has slots of its own; non-streaming requests take none.
    other = await open_stream(http, one.base_url, "hi", **{"X-OpenWebUI-User-Id": "bob"})
    assert other.status_code == 200
    await other.aclose()
    assert (await http.post(f"{one.base_url}/v1/chat/completions", json=body("hi"))).is_success

    # A closed stream frees its slot.
    await first.aclose()
    third = await _admitted(http, one.base_url)
    # A killed web process's stream frees its slot once its lease lapses, not before.
    assert two.web is not None
    two.web.stop(signal.SIGKILL)
    await second.aclose()
    fourth = await _admitted(http, one.base_url)
    # Leases of live streams are renewed: after more than a lease period both still count.
    await asyncio.sleep(6)
    refused = await open_stream(http, one.base_url, "still full")
    assert_stream_refused(refused, (await refused.aread()).decode())
    for response in (third, fourth):
        await response.aclose()


async def _admitted(http: httpx.AsyncClient, base_url: str) -> httpx.Response:
    """A stream opened as soon as a slot is free (releases and lapses are asynchronous)."""
    async with asyncio.timeout(20):
        while True:
            response = await open_stream(http, base_url)
            if response.status_code == 200:
                return response
            assert_stream_refused(response, (await response.aread()).decode())
            await asyncio.sleep(0.2)


async def test_a_stream_ends_when_its_generation_ended_without_its_end_event(
    make_stack: Callable[..., Stack], http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_KEEPALIVE_INTERVAL="0.2")
    stack.start_web()
    stack.start_worker()
    done = await http.post(f"{stack.base_url}/v1/chat/completions", json=body("hello"))
    completion_id = done.json()["id"]
    # The generation is stored as completed, but its replay log lost the `end` event: before,
    # a client attaching got the text, then `: ping` comments for as long as it stayed.
    redis = aioredis.Redis.from_url(stack.env["HAIA_REDIS_URL"])
    try:
        ended = await redis.rpop(keys.gen_log(completion_id))
    finally:
        await redis.aclose()
    assert ended is not None and b'"end"' in ended
    url = f"{stack.base_url}/v1/chat/completions/{completion_id}/stream"
    async with asyncio.timeout(20), http.stream("GET", url) as response:
        got = await read_all(response)
    assert got[-1].data == "[DONE]"
    assert content_of(got) == "Echo: hello"
    finishes = [
        choice["finish_reason"]
        for frame in got
        if frame.data and frame.data != "[DONE]"
        for choice in frame.json()["choices"]
    ]
    assert finishes[-1] == "stop"


# --- the context window's budget ----------------------------------------------------------------


async def test_system_messages_count_inside_the_context_window(
    make_stack: Callable[..., Stack], http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_CONTEXT_MESSAGES="4")
    stack.start_web()
    stack.start_worker()
    url = f"{stack.base_url}/v1/chat/completions"
    history: list[dict[str, str]] = [{"role": "system", "content": "S-old"}]
    for i in range(6):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        if i == 1:
            history.append({"role": "system", "content": "S-latest"})
    first = await http.post(url, json={"messages": [*history, {"role": "user", "content": "q6"}]})
    assert first.status_code == 200, first.text
    conversation = {"X-Conversation-ID": first.headers["x-conversation-id"]}

    async def sent_for(content: str) -> list[dict[str, object]]:
        await stack.forget_upstream_requests()
        response = await http.post(url, json=body(content), headers=conversation)
        assert response.status_code == 200, response.text
        [sent] = await stack.upstream_requests()
        return list(sent["body"]["messages"])

    # The latest system message is older than the window: it takes the oldest place.
    sent = await sent_for("q7")
    clients = [m for m in sent if not str(m["content"]).startswith("You are HAIA")]
    assert len(clients) == 4 + 1  # HAIA_CONTEXT_MESSAGES + the new turn, system included
    assert clients[0] == {"role": "system", "content": "S-latest"}
    assert "S-old" not in [m["content"] for m in sent]
    assert clients[-1] == {"role": "user", "content": "q7"}
    assert any(str(m["content"]).startswith("You are HAIA") for m in sent)  # always, uncounted

    # System messages inside the window count like any other message.
    await http.post(
        url,
        json={
            "messages": [
                {"role": "system", "content": "S1"},
                {"role": "system", "content": "S2"},
                {"role": "user", "content": "q8"},
            ]
        },
        headers=conversation,
    )
    sent = await sent_for("q9")
    clients = [m for m in sent if not str(m["content"]).startswith("You are HAIA")]
    assert len(clients) == 4 + 1
    assert clients[-1] == {"role": "user", "content": "q9"}


# --- max_tokens and numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('"max_tokens": 0', "max_tokens"),
        ('"max_tokens": -5', "max_tokens"),
        ('"max_tokens": 1000001', "max_tokens"),
        ('"max_tokens": 1e300', "max_tokens"),
        ('"max_completion_tokens": 99999999999999999999999', "max_completion_tokens"),
        ('"max_completion_tokens": 0', "max_completion_tokens"),
        ('"logit_bias": {"50256": Infinity}', None),
        ('"temperature": NaN', None),
        ('"logit_bias": {"50256": 1000}', "logit_bias.50256"),
        ('"seed": 1' + "0" * 40, "seed"),
    ],
)
async def test_absurd_numbers_are_a_400_naming_the_field(
    stack: Stack, http: httpx.AsyncClient, raw: str, param: str | None
) -> None:
    data = '{"messages": [{"role": "user", "content": "x"}], ' + raw + "}"
    response = await http.post(
        f"{stack.base_url}/v1/chat/completions",
        content=data,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param


async def test_the_largest_max_tokens_is_passed_on_as_sent(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    await stack.forget_upstream_requests()
    response = await http.post(
        f"{stack.base_url}/v1/chat/completions",
        json=body("big budget", max_completion_tokens=1_000_000, stream=True),
    )
    assert response.status_code == 200, response.text
    [sent] = await stack.upstream_requests()
    assert sent["body"].get("max_completion_tokens", sent["body"].get("max_tokens")) == 1_000_000


# --- malformed text, ids and headers: 4xx on SQLite and PostgreSQL ------------------------------

LONG = "c" * 500
TASK = "### Task:\nGenerate a concise title for this chat.\n### Chat History:\nUSER: hi"


@pytest.mark.parametrize(
    ("payload", "headers", "status", "param"),
    [
        (body("a\u0000b"), {}, 400, "messages[0].content"),
        (body("a\u0000b", stream=True), {}, 400, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\u0000"}]}]},
            {},
            400,
            "messages[0].content[0].text",
        ),
        ({**body("x"), "model": "ollama:fake\u0000"}, {}, 400, "model"),
        ({**body("x"), "user": "\u0000"}, {}, 400, "user"),
        ({**body("x"), "metadata": {"k\u0000": "v"}}, {}, 400, "metadata.<key>"),
        (body("lone \ud800 surrogate"), {}, 400, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_call_id": "\udfff"}]},
            {},
            400,
            "messages[0].tool_call_id",
        ),
        (body("x"), {"X-OpenWebUI-Chat-Id": LONG}, 400, "X-OpenWebUI-Chat-Id"),
        (body(TASK), {"X-OpenWebUI-Chat-Id": LONG}, 400, "X-OpenWebUI-Chat-Id"),
        (body(TASK), {"X-OpenWebUI-Chat-Id": "a\x01b"}, 400, "X-OpenWebUI-Chat-Id"),
        (body("x"), {"X-OpenWebUI-User-Id": LONG}, 400, "X-OpenWebUI-User-Id"),
        (body(TASK), {"X-OpenWebUI-Chat-Id": b"\xff\xfe"}, 400, "X-OpenWebUI-Chat-Id"),
        (body("x"), {"X-OpenWebUI-User-Id": b"\xc3("}, 400, "X-OpenWebUI-User-Id"),
        (body("x"), {"X-Conversation-ID": LONG}, 400, "X-Conversation-ID"),
        (body("x"), {"X-Conversation-ID": "\u00b2"}, 404, "X-Conversation-ID"),
        ({**body("x"), "model": "m" * 5000}, {}, 400, "model"),
    ],
)
async def test_malformed_text_and_headers_are_4xx_on_every_database(
    stack: Stack,
    http: httpx.AsyncClient,
    payload: dict[str, object],
    headers: dict[str, str | bytes],
    status: int,
    param: str,
) -> None:
    sent = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in headers.items()}
    response = await http.post(
        f"{stack.base_url}/v1/chat/completions",
        content=json.dumps(payload),  # ASCII: lone surrogates travel as \ud800 escapes
        headers={**sent, b"Content-Type": b"application/json"},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/chat/completions/chatcmpl-%00"),
        ("GET", "/v1/chat/completions/" + "chatcmpl-" + "x" * 500),
        ("GET", "/v1/chat/completions/chatcmpl-%00/stream"),
        ("POST", "/v1/chat/completions/chatcmpl-%00/cancel"),
        ("GET", "/v1/conversations/%00"),
        ("GET", "/v1/conversations/" + "x" * 500),
        ("DELETE", "/v1/conversations/%00"),
        ("GET", "/v1/conversations?limit=%00"),
        ("GET", "/v1/conversations?limit=99999999999999999999999"),
        ("GET", "/v1/conversations?after=%00"),
        ("GET", "/v1/chat/completions/chatcmpl-x/stream?starting_after=%00"),
        ("GET", "/v1/chat/completions/chatcmpl-x/stream?starting_after=1" + "0" * 30),
    ],
)
async def test_malformed_ids_and_numbers_are_4xx_on_every_database(
    stack: Stack, http: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await http.request(method, f"{stack.base_url}{path}")
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_over_long_and_nul_headers_are_4xx(stack: Stack) -> None:
    host, port = stack.base_url.removeprefix("http://").split(":")
    for header in (b"X-Filler: " + b"x" * 20_000, b"X-OpenWebUI-Chat-Id: a\x00b"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        raw = await reader.read()
        writer.close()
        status = int(raw.split(b" ", 2)[1])
        assert 400 <= status < 500, raw[:500]
