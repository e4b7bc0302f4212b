"""End to end: web and worker as real processes, driven by the openai SDK and raw SSE reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests import dbcheck
from tests.procs import Stack
from tests.sse import frames, read_all

pytestmark = pytest.mark.e2e


@pytest.fixture
async def sdk(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


async def test_non_streaming_completion_is_stored(stack: Stack, sdk: AsyncOpenAI) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="ollama:fake-model", messages=[{"role": "user", "content": "hello there"}]
    )
    completion = raw.parse()
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "ollama:fake-model"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Echo: hello there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    conversation_id = raw.headers["x-conversation-id"]
    assert raw.headers["x-request-id"]

    rows = await dbcheck.messages(stack.database_url, conversation_id)
    assert [(r["role"], r["content"], r["status"]) for r in rows] == [
        ("user", "hello there", "completed"),
        ("assistant", "Echo: hello there", "completed"),
    ]
    assistant = rows[1]
    assert assistant["completion_id"] == completion.id
    assert assistant["model"] == "ollama:fake-model"
    assert assistant["finish_reason"] == "stop"
    assert assistant["completion_tokens"] == 3
    assert assistant["prompt_tokens"] and assistant["prompt_tokens"] > 0
    assert assistant["request_id"] == raw.headers["x-request-id"]
    assert assistant["started_at"] and assistant["first_token_at"] and assistant["finished_at"]


async def test_streaming_with_the_sdk(stack: Stack, sdk: AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="ollama:fake-model",
        messages=[{"role": "user", "content": "#fake tokens=12"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f"tok{i} " for i in range(12))
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])  # absent: the SDK reads it as None
    assert len({c.id for c in chunks}) == 1


async def test_text_that_json_escapes_streams_exactly(stack: Stack, sdk: AsyncOpenAI) -> None:
    """Deltas paced so the relay writes them straight from Redis to the client, their JSON
    spliced without decoding (`app.events.plain_delta`): quotes, `", "`, backslashes,
    non-ASCII, U+2028 and JSON-looking text arrive exactly."""
    text = 'quote "a", "b" back\\slash\\ é 😀 line\u2028sep {"seq": 1, "type": "end"}'
    stream = await sdk.chat.completions.create(
        model="ollama:fake-model",
        messages=[{"role": "user", "content": f"{text} #fake delay=0.02"}],
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert got == f"Echo: {text}"
    assert sum(c.choices[0].finish_reason is not None for c in chunks if c.choices) == 1


async def test_raw_sse_transcript_order(stack: Stack) -> None:
    body = {
        "model": "ollama:fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": "one two three"}],
    }
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-conversation-id"]
        transcript = await read_all(response)
    data = [f for f in transcript if not f.comment]
    assert data[-1].data == "[DONE]"
    chunks = [f.json() for f in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert contents == ["Echo:", " one", " two", " three"]
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "usage" not in chunks[0]  # only with stream_options.include_usage
    ids = [int(f.id) for f in data[1:-1] if f.id is not None]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 5


async def test_client_that_leaves_early_still_gets_the_turn_stored(stack: Stack) -> None:
    body = {
        "model": "ollama:fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": "#fake tokens=60 delay=0.02"}],
    }
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) as response,
    ):
        conversation_id = response.headers["x-conversation-id"]
        seen = 0
        async for frame in frames(response):
            if frame.data and '"content":"tok' in frame.data:
                completion_id = frame.json()["id"]
                seen += 1
            if seen == 3:
                break  # leave: the connection closes with the context
    row = await dbcheck.wait_for_status(stack.database_url, completion_id, {"completed"})
    assert row["status"] == "completed"
    assert row["content"] == "".join(f"tok{i} " for i in range(60))
    rows = await dbcheck.messages(stack.database_url, conversation_id)
    assert [r["role"] for r in rows] == ["user", "assistant"]


async def test_conversation_continues_with_its_history(stack: Stack, sdk: AsyncOpenAI) -> None:
    first = await sdk.chat.completions.with_raw_response.create(
        model="ollama:fake-model",
        messages=[
            {"role": "system", "content": "Answer like a pirate."},
            {"role": "user", "content": "first question"},
        ],
    )
    conversation_id = first.headers["x-conversation-id"]
    await stack.forget_upstream_requests()
    second = await sdk.chat.completions.with_raw_response.create(
        model="ollama:fake-model",
        messages=[{"role": "user", "content": [{"type": "text", "text": "second question"}]}],
        extra_headers={"X-Conversation-ID": conversation_id},
        temperature=0.3,
        top_p=0.9,
        max_tokens=77,
        stop=["END"],
        seed=7,
    )
    assert second.headers["x-conversation-id"] == conversation_id
    assert second.parse().choices[0].message.content == "Echo: second question"

    [sent] = [r["body"] for r in (await stack.upstream_requests())]
    roles_contents = [(m["role"], m["content"]) for m in sent["messages"]]
    system = [content for role, content in roles_contents if role == "system"]
    assert system[0] == "Answer like a pirate."  # the client's own system message is kept
    assert "You are HAIA" in system[1]  # and HAIA's instructions are sent every turn
    assert [rc for rc in roles_contents if rc[0] != "system"] == [
        ("user", "first question"),
        ("assistant", "Echo: first question"),
        ("user", "second question"),
    ]
    assert sent["temperature"] == 0.3 and sent["top_p"] == 0.9 and sent["seed"] == 7
    assert sent["stop"] == ["END"]
    assert 77 in (sent.get("max_tokens"), sent.get("max_completion_tokens"))
    rows = await dbcheck.messages(stack.database_url, conversation_id)
    assert [r["role"] for r in rows] == ["system", "user", "assistant", "user", "assistant"]


async def test_context_window_is_bounded(stack: Stack, sdk: AsyncOpenAI) -> None:
    history: list[ChatCompletionMessageParam] = []
    for i in range(12):  # 24 stored messages before the last turn
        history += [
            {"role": "user", "content": f"q{i}"},
            {"role": "assistant", "content": f"a{i}"},
        ]
    raw = await sdk.chat.completions.with_raw_response.create(
        model="ollama:fake-model", messages=[*history, {"role": "user", "content": "q12"}]
    )
    await stack.forget_upstream_requests()
    await sdk.chat.completions.create(
        model="ollama:fake-model",
        messages=[{"role": "user", "content": "latest"}],
        extra_headers={"X-Conversation-ID": raw.headers["x-conversation-id"]},
    )
    [sent] = [r["body"] for r in (await stack.upstream_requests())]
    non_system = [m for m in sent["messages"] if m["role"] != "system"]
    assert len(non_system) == 20 + 1  # HAIA_CONTEXT_MESSAGES history + the new turn
    assert non_system[-1]["content"] == "latest"


async def test_tools_and_unknown_fields_are_accepted(stack: Stack) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": "x" * 600,
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
        for i in range(36)
    ]
    body = {
        "model": "ollama:fake-model",
        "messages": [{"role": "user", "content": "with tools"}],
        "tools": tools,
        "tool_choice": "auto",
        "response_format": {"type": "text"},
        "frequency_penalty": 0.1,
        "presence_penalty": 0.1,
        "logprobs": False,
        "metadata": {"chat_id": "x"},
        "some_future_field": {"a": 1},
    }
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{stack.base_url}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Echo: with tools"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "ollama:fake-model", "messages": []}, 400, "messages"),
        (
            {"model": "ollama:fake-model", "n": 2, "messages": [{"role": "user", "content": "x"}]},
            400,
            "n",
        ),
        (
            {"model": "ollama:fake-model", "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages[0].role",
        ),
        ({"model": "ollama:nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ],
)
async def test_bad_requests_get_openai_errors(
    stack: Stack, body: dict[str, object], status: int, param: str
) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{stack.base_url}/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert "Traceback" not in response.text


async def test_unknown_model_with_the_sdk(stack: Stack, sdk: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.chat.completions.create(
            model="gpt-nonexistent", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.code == "model_not_found"


async def test_unknown_conversation_is_404_and_stores_nothing(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    before = await dbcheck.query(stack.database_url, "SELECT COUNT(*) AS n FROM haia_message")
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(
            model="ollama:fake-model",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Conversation-ID": "no-such-conversation"},
        )
    after = await dbcheck.query(stack.database_url, "SELECT COUNT(*) AS n FROM haia_message")
    assert after == before


async def test_malformed_json_is_400(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{stack.base_url}/v1/chat/completions",
            content=b'{"messages": [',
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_models_and_health(stack: Stack, sdk: AsyncOpenAI) -> None:
    models = await sdk.models.list()
    assert [m.id for m in models.data] == [
        "ollama:fake-model",
        "openai-chat:fake-model",
        "anthropic:claude-fake",
    ]
    async with httpx.AsyncClient(timeout=30) as http:
        health = await http.get(f"{stack.base_url}/health")
    assert health.status_code == 200
    checks = health.json()["checks"]
    assert {name: check["status"] for name, check in checks.items()} == {
        "database": "ok",
        "redis": "ok",
        "workers": "ok",
        "upstream": "ok",
    }


async def test_openai_chat_provider_reaches_the_upstream(stack: Stack, sdk: AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="openai-chat:fake-model", messages=[{"role": "user", "content": "via openai"}]
    )
    assert completion.choices[0].message.content == "Echo: via openai"
    sent = (await stack.upstream_requests())[-1]
    assert sent["headers"]["authorization"] == "Bearer sk-test-not-a-real-key"


async def test_many_concurrent_streams(stack: Stack, sdk: AsyncOpenAI) -> None:

    async def one(i: int) -> str:
        stream = await sdk.chat.completions.create(
            model="ollama:fake-model",
            messages=[{"role": "user", "content": f"#fake tokens={5 + i % 7} delay=0.01"}],
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    results = await asyncio.gather(*(one(i) for i in range(40)))
    for i, text in enumerate(results):
        assert text == "".join(f"tok{n} " for n in range(5 + i % 7))
