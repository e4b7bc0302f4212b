"""The whole chat surface end to end: images, knobs, tool calls and their results, reasoning,
every SSE frame with an id. The `openai` SDK against web + worker; the fake upstream records
what reached the model."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from tests import dbcheck
from tests.procs import Stack
from tests.sse import read_all

pytestmark = pytest.mark.e2e

# A 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture
async def sdk(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


async def conversation(stack: Stack, conversation_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(f"{stack.base_url}/v1/conversations/{conversation_id}")
    return dict(response.json())


async def last_request(stack: Stack) -> dict[str, Any]:
    requests = await stack.upstream_requests()
    assert requests, "the upstream received nothing"
    return dict(requests[-1]["body"])


async def test_every_knob_reaches_the_model(stack: Stack, sdk: AsyncOpenAI) -> None:
    await stack.forget_upstream_requests()
    schema = {
        "name": "answer",
        "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
        "strict": True,
    }
    knobs: dict[str, Any] = {
        "temperature": 0.25,
        "top_p": 0.5,
        "max_completion_tokens": 123,
        "stop": ["END", "STOP"],
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"50256": -100},
        "reasoning_effort": "low",
        "user": "alice",
        "response_format": {"type": "json_schema", "json_schema": schema},
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    }
    await sdk.chat.completions.create(
        model="openai-chat:fake-model",
        messages=[{"role": "user", "content": "knobs"}],
        **knobs,
    )
    sent = await last_request(stack)
    assert sent["temperature"] == 0.25 and sent["top_p"] == 0.5
    assert sent.get("max_completion_tokens", sent.get("max_tokens")) == 123
    assert sent["stop"] == ["END", "STOP"] and sent["seed"] == 42
    assert sent["presence_penalty"] == 0.5 and sent["frequency_penalty"] == -0.5
    assert sent["logit_bias"] == {"50256": -100}
    assert sent["reasoning_effort"] == "low"
    assert sent["user"] == "alice"
    assert sent["response_format"] == {"type": "json_schema", "json_schema": schema}
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]
    assert sent["tools"][0]["function"]["parameters"]["required"] == ["city"]
    # A named choice forces that tool: pydantic-ai offers only it, as `required`.
    assert sent["tool_choice"] in (
        "required",
        {"type": "function", "function": {"name": "get_weather"}},
    )
    assert sent["parallel_tool_calls"] is False


async def test_json_object_mode_reaches_the_model(stack: Stack, sdk: AsyncOpenAI) -> None:
    await stack.forget_upstream_requests()
    await sdk.chat.completions.create(
        model="ollama:fake-model",
        messages=[{"role": "user", "content": "reply in JSON"}],
        response_format={"type": "json_object"},
    )
    assert (await last_request(stack))["response_format"] == {"type": "json_object"}


async def test_images_reach_the_model_are_stored_once_and_come_back_as_context(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    await stack.forget_upstream_requests()
    question: Any = {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is in this picture?"},
            {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.jpg"}},
        ],
    }
    raw = await sdk.chat.completions.with_raw_response.create(
        model="ollama:fake-model", messages=[question]
    )
    first = raw.parse()
    conversation_id = raw.headers["x-conversation-id"]
    sent = await last_request(stack)
    parts = sent["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    assert parts[1]["image_url"]["url"] == PNG_URL
    assert parts[2]["image_url"]["url"] == "https://example.invalid/cat.jpg"

    # OpenWebUI resends the whole history, picture included: stored once, sent again.
    answer: Any = {"role": "assistant", "content": first.choices[0].message.content}
    await sdk.chat.completions.create(
        model="ollama:fake-model",
        messages=[question, answer, {"role": "user", "content": "and its colour?"}],
    )
    sent = await last_request(stack)
    history_parts = sent["messages"][-3]["content"]
    assert history_parts[1]["image_url"]["url"] == PNG_URL
    rows = await dbcheck.messages(stack.database_url, conversation_id)
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"]
    assert PNG_URL not in json.dumps([r["content"] for r in rows])  # rows stay small
    blobs = await dbcheck.query(stack.database_url, "SELECT media_type FROM haia_blob")
    assert [b["media_type"] for b in blobs].count("image/png") == 1

    detail = await conversation(stack, conversation_id)
    shown = detail["messages"][0]["content"]
    assert shown[1]["image_url"]["url"] == PNG_URL


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "type"),
        ({"type": "file", "file": {"file_id": "file-1"}}, "type"),
        ({"type": "image_url", "image_url": {"url": "ftp://host/x.png"}}, "image_url"),
    ],
)
async def test_a_part_no_model_takes_is_a_400_naming_it(
    stack: Stack, part: dict[str, Any], param: str
) -> None:
    body = {
        "model": "ollama:fake-model",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}],
    }
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{stack.base_url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == f"messages[0].content[1].{param}"
    assert part["type"] in error["message"]


async def test_tool_results_in_history_are_stored_once_and_sent_in_order(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    await stack.forget_upstream_requests()
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    history: list[Any] = [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -3}'},
    ]
    raw = await sdk.chat.completions.with_raw_response.create(
        model="ollama:fake-model",
        messages=history,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    conversation_id = raw.headers["x-conversation-id"]
    sent = (await last_request(stack))["messages"]
    non_system = [m for m in sent if m["role"] != "system"]
    assert [m["role"] for m in non_system] == ["user", "assistant", "tool"]
    assert non_system[1]["tool_calls"][0]["id"] == "call_1"
    assert non_system[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(non_system[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    assert non_system[2]["tool_call_id"] == "call_1" and non_system[2]["content"] == '{"temp": -3}'

    # The same history resent with one more turn: nothing stored twice.
    answer = raw.parse().choices[0].message.content
    await sdk.chat.completions.create(
        model="ollama:fake-model",
        messages=[
            *history,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "thanks"},
        ],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    rows = await dbcheck.messages(stack.database_url, conversation_id)
    assert [r["role"] for r in rows] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    detail = await conversation(stack, conversation_id)
    assert detail["messages"][1]["tool_calls"][0]["id"] == "call_1"
    assert detail["messages"][2]["tool_call_id"] == "call_1"


async def test_every_data_frame_but_done_has_an_id(stack: Stack) -> None:
    body = {
        "model": "ollama:fake-model",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "#fake tokens=3"}],
    }
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) as response,
    ):
        received = await read_all(response)
    data = [f for f in received if f.data is not None]
    assert data[-1].data == "[DONE]" and data[-1].id is None
    assert all(f.id is not None for f in data[:-1]), [(f.id, f.data) for f in data]
    ids = [int(str(f.id)) for f in data[:-1]]
    assert ids == sorted(ids) and ids[0] == 1
    usage = data[-2].json()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    completion_id = data[0].json()["id"]
    # Resuming after the finish chunk's id replays nothing, not the usage chunk again.
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream(
            "GET",
            f"{stack.base_url}/v1/chat/completions/{completion_id}/stream",
            params={"include_usage": "true"},
            headers={"Last-Event-ID": str(data[-2].id)},
        ) as response,
    ):
        again = await read_all(response)
    assert [f.data for f in again if f.data] == ["[DONE]"]
