"""The Responses API end to end: the `openai` SDK's `responses.*` against HAIA's web and worker
processes, on SQLite and PostgreSQL, every upstream kind of the fake (Ollama's and any
OpenAI-compatible server's Chat Completions wire, Anthropic's Messages wire). Every streamed
event is validated against the SDK's own `ResponseStreamEvent` types."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.procs import Stack
from tests.sse import Frame, frames

pytestmark = pytest.mark.e2e

MODELS = ["ollama:fake-model", "openai-chat:fake-model", "anthropic:claude-fake"]
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
TERMINAL = {"response.completed", "response.incomplete", "response.failed"}

StackFactory = Callable[..., Stack]


def expected(tokens: int) -> str:
    return "".join(f"tok{i} " for i in range(tokens))


def checked(event: dict[str, Any]) -> dict[str, Any]:
    """`event` validated against the SDK's types (the failed response's own error code is
    HAIA's, e.g. context_length_exceeded, which the SDK's literal does not list)."""
    if event["type"] == "response.failed" and event["response"]["error"]["code"] not in (
        "server_error",
        "rate_limit_exceeded",
    ):
        event = {**event, "response": {**event["response"], "error": None}}
    EVENTS.validate_python(event)
    return event


def assert_order(events: list[dict[str, Any]]) -> None:
    """Sequence numbers from 0 without gaps, created first, one terminal event last."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] in TERMINAL
    assert sum(1 for e in events if e["type"] in TERMINAL) == 1


@pytest.fixture
async def sdk(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=30)) as client:
        yield client


async def raw_stream(
    http: httpx.AsyncClient, method: str, url: str, *, limit: int | None = None, **kwargs: Any
) -> list[Frame]:
    got: list[Frame] = []
    async with http.stream(method, url, **kwargs) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for frame in frames(r):
            got.append(frame)
            if limit is not None and len([f for f in got if f.event]) >= limit:
                break
    return got


def events_of(got: list[Frame]) -> list[dict[str, Any]]:
    out = []
    for frame in got:
        if frame.data and frame.data != "[DONE]":
            assert frame.id is None  # no SSE ids on the Responses wire
            event = frame.json()
            assert frame.event == event["type"]
            out.append(checked(event))
    return out


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


@pytest.mark.parametrize("model", MODELS)
async def test_create_non_stream_answers_with_a_whole_response(
    stack: Stack, sdk: AsyncOpenAI, model: str
) -> None:
    response = await sdk.responses.create(
        model=model,
        input="#fake tokens=5",
        instructions="Be brief.",
        metadata={"k": "v"},
        temperature=0.5,
    )
    Response.model_validate(response.model_dump(warnings=False))
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.output_text == expected(5)
    message = response.output[0]
    assert message.type == "message" and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert response.metadata == {"k": "v"}
    assert response.instructions == "Be brief."
    assert response.temperature == 0.5
    assert response.usage is not None and response.usage.output_tokens == 5
    assert response.conversation is not None
    # HAIA's homelab prompt is not added; the instructions go first.
    sent = (await stack.upstream_requests())[-1]["body"]
    if model.startswith("anthropic"):
        assert "Be brief." in json.dumps(sent["system"])
        assert "homelab" not in json.dumps(sent["system"]).lower()
    else:
        assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
        assert "homelab" not in json.dumps(sent["messages"]).lower()


@pytest.mark.parametrize("model", MODELS)
async def test_stream_sends_openai_events_in_order(
    stack: Stack, sdk: AsyncOpenAI, model: str
) -> None:
    stream = await sdk.responses.create(model=model, input="#fake tokens=6", stream=True)
    events = [
        checked(event.model_dump(exclude_unset=True, warnings=False)) async for event in stream
    ]
    assert_order(events)
    kinds = [e["type"] for e in events]
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert text_of(events) == expected(6)
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == expected(6)
    assert final["status"] == "completed" and final["usage"]["output_tokens"] == 6


async def test_stream_helper_and_raw_wire(
    stack: Stack, sdk: AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    async with sdk.responses.stream(model="ollama:fake-model", input="#fake tokens=4") as stream:
        async for event in stream:
            checked(event.model_dump(exclude_unset=True, warnings=False))
        final = await stream.get_final_response()
    assert final.output_text == expected(4)
    got = await raw_stream(
        http,
        "POST",
        f"{stack.base_url}/v1/responses",
        json={"model": "ollama:fake-model", "input": "#fake tokens=3", "stream": True},
    )
    assert got[-1].data == "[DONE]"
    events = events_of(got)
    assert_order(events)
    assert text_of(events) == expected(3)
