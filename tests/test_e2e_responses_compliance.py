"""The Open Responses specification's seven compliance cases, against a real HAIA stack.

The spec's own suite (its `compliance-tests` module) sends seven requests to `POST /responses`
and checks each answer against its `ResponseResource` schema, every streamed event against the
event schemas, and a few semantics (output present, status `completed`, a `function_call` when
a tool is offered). These are our own versions of the same requests and checks, with stricter
validation (tests/responses_spec.py: the spec's published models and the `openai` SDK's types,
strict mode, plus the stream's grammar), on an OpenAI-wire model and an Anthropic model, each on
SQLite and PostgreSQL. Where the fake upstream can show it, each case also checks that what the
client sent reached the model (the system prompt, the image, the history).

The two tool cases ask a plain question with a tool offered, as the spec's suite does: a script
rule of the fake upstream (tests/fake_upstream.py) makes the model call that tool.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.procs import Stack
from tests.responses_spec import Stream, check_response, check_stream, output_text

pytestmark = pytest.mark.e2e

MODELS = ["ollama:fake-model", "anthropic:claude-fake"]
WEATHER_QUESTION = "What's the weather like in San Francisco?"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather for a location",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. Boston, MA"}
        },
        "required": ["location"],
    },
}
WEATHER_ARGUMENTS = {"location": "San Francisco, CA"}
# A 1x1 PNG, sent inline as the spec's image case does.
IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
    "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def message(role: str, content: Any) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": content}


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    await stack.forget_upstream_requests()
    headers = {"Authorization": "Bearer sk-compliance"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture
async def weather_rule(stack: Stack) -> AsyncIterator[None]:
    """The fake model calls `get_weather` when asked about the weather (and no result is in)."""
    rule = {
        "match": WEATHER_QUESTION,
        "calls": [{"name": "get_weather", "arguments": WEATHER_ARGUMENTS}],
    }
    async with httpx.AsyncClient(base_url=stack.upstream_url) as upstream:
        assert (await upstream.post("/_script", json=rule)).status_code == 200
        yield
        await upstream.delete("/_script")


async def create(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed response, strictly valid."""
    response = await http.post("/v1/responses", json={**body, "stream": False})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return check_response(response.text)


async def create_stream(http: httpx.AsyncClient, body: dict[str, Any]) -> Stream:
    """A streamed response, every event strictly valid and the stream well formed."""
    response = await http.post("/v1/responses", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return check_stream(response.text)


def weather_request(model: str) -> dict[str, Any]:
    """The compliance cases' tool-calling request: the question, with the weather tool."""
    return {"model": model, "input": [message("user", WEATHER_QUESTION)], "tools": [WEATHER_TOOL]}


def completed_with_text(body: dict[str, Any], text: str) -> None:
    """The spec's `hasOutput` and `completedStatus`, and the model's answer in the output."""
    assert body["status"] == "completed"
    assert body["output"], "the response has no output items"
    [item] = [item for item in body["output"] if item["type"] == "message"]
    assert item["role"] == "assistant" and item["status"] == "completed"
    assert output_text(body) == text
    assert body["usage"]["output_tokens"] > 0


async def upstream_request(stack: Stack) -> dict[str, Any]:
    """The one model request this case made, as the fake upstream received it."""
    [request] = await stack.upstream_requests()
    return request


def sent_texts(request: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) of every message sent to the model, the Anthropic `system` included."""
    body = request["body"]
    texts = [("system", str(body["system"]))] if body.get("system") else []
    for item in body["messages"]:
        content = item["content"]
        if isinstance(content, list):
            content = " ".join(part.get("text", "") for part in content if "text" in part)
        texts.append((item["role"], str(content)))
    return texts


@pytest.mark.parametrize("model", MODELS)
async def test_basic_response(stack: Stack, http: httpx.AsyncClient, model: str) -> None:
    body = await create(
        http, {"model": model, "input": [message("user", "Say hello in exactly 3 words.")]}
    )
    completed_with_text(body, "Echo: Say hello in exactly 3 words.")
    assert body["object"] == "response" and body["id"]


@pytest.mark.parametrize("model", MODELS)
async def test_streaming_response(stack: Stack, http: httpx.AsyncClient, model: str) -> None:
    stream = await create_stream(
        http, {"model": model, "input": [message("user", "Count from 1 to 5.")]}
    )
    completed_with_text(stream.response, "Echo: Count from 1 to 5.")
    assert stream.text() == "Echo: Count from 1 to 5."
    assert stream.types[:2] == ["response.created", "response.in_progress"]
    assert stream.types[-1] == "response.completed"
    for kind in ("response.output_item.added", "response.content_part.added"):
        assert kind in stream.types
    for kind in ("response.output_text.done", "response.content_part.done"):
        assert kind in stream.types


@pytest.mark.parametrize("model", MODELS)
async def test_system_prompt(stack: Stack, http: httpx.AsyncClient, model: str) -> None:
    pirate = "You are a pirate. Always respond in pirate speak."
    body = await create(
        http,
        {"model": model, "input": [message("system", pirate), message("user", "Say hello.")]},
    )
    completed_with_text(body, "Echo: Say hello.")
    texts = sent_texts(await upstream_request(stack))
    assert texts[0] == ("system", pirate)
    assert texts[-1] == ("user", "Say hello.")


@pytest.mark.parametrize("model", MODELS)
async def test_tool_calling(
    stack: Stack, http: httpx.AsyncClient, weather_rule: None, model: str
) -> None:
    body = await create(http, weather_request(model))
    assert body["output"], "the response has no output items"
    [call] = [item for item in body["output"] if item["type"] == "function_call"]
    assert call["name"] == "get_weather" and call["status"] == "completed"
    assert json.loads(call["arguments"]) == WEATHER_ARGUMENTS
    assert call["call_id"] and call["id"]
    [tool] = body["tools"]
    assert {key: tool[key] for key in ("type", "name", "description", "parameters")} == WEATHER_TOOL
    request = await upstream_request(stack)
    offered = request["body"]["tools"]
    assert [t.get("name") or t["function"]["name"] for t in offered] == ["get_weather"]


@pytest.mark.parametrize("model", MODELS)
async def test_tool_calling_streaming(
    stack: Stack, http: httpx.AsyncClient, weather_rule: None, model: str
) -> None:
    stream = await create_stream(http, weather_request(model))
    added = [e["item"] for e in stream.of_type("response.output_item.added")]
    done = [e["item"] for e in stream.of_type("response.output_item.done")]
    assert "function_call" in [item["type"] for item in added]
    assert stream.of_type("response.function_call_arguments.delta")
    [arguments] = stream.of_type("response.function_call_arguments.done")
    assert json.loads(arguments["arguments"]) == WEATHER_ARGUMENTS
    [call] = [item for item in done if item["type"] == "function_call"]
    assert call["name"] == "get_weather" and call["call_id"]
    assert stream.response["status"] == "completed"
    assert [i for i in stream.response["output"] if i["type"] == "function_call"] == [call]


@pytest.mark.parametrize("model", MODELS)
async def test_image_input(stack: Stack, http: httpx.AsyncClient, model: str) -> None:
    question = "What do you see in this image? Answer in one sentence."
    content = [
        {"type": "input_text", "text": question},
        {"type": "input_image", "image_url": IMAGE},
    ]
    body = await create(http, {"model": model, "input": [message("user", content)]})
    completed_with_text(body, f"Echo: {question} [images: 1]")


@pytest.mark.parametrize("model", MODELS)
async def test_multi_turn(stack: Stack, http: httpx.AsyncClient, model: str) -> None:
    hello = "Hello Alice! Nice to meet you. How can I help you today?"
    body = await create(
        http,
        {
            "model": model,
            "input": [
                message("user", "My name is Alice."),
                message("assistant", hello),
                message("user", "What is my name?"),
            ],
        },
    )
    completed_with_text(body, "Echo: What is my name?")
    assert sent_texts(await upstream_request(stack)) == [
        ("user", "My name is Alice."),
        ("assistant", hello),
        ("user", "What is my name?"),
    ]
