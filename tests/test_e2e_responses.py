"""The Responses API end to end: the `openai` SDK's `responses.*` against HAIA's web and worker
processes, on SQLite and PostgreSQL, every upstream kind of the fake (Ollama's and any
OpenAI-compatible server's Chat Completions wire, Anthropic's Messages wire). Every streamed
event is validated against the SDK's own `ResponseStreamEvent` types."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import httpx
import pytest
import redis.asyncio as aioredis
from openai import APIStatusError, AsyncOpenAI, BadRequestError, NotFoundError
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from app import keys
from tests import dbcheck
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
    shown = event
    if event["type"] == "response.failed" and event["response"]["error"]["code"] not in (
        "server_error",
        "rate_limit_exceeded",
    ):
        shown = {**event, "response": {**event["response"], "error": None}}
    EVENTS.validate_python(shown)
    return event


def dumped(event: Any) -> dict[str, Any]:
    """An SDK event as the JSON it came from, validated."""
    return checked(event.model_dump(exclude_unset=True, warnings=False))


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
    events = [dumped(event) async for event in stream]
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
            dumped(event)
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


def search_tool(name: str = "search") -> dict[str, Any]:
    return {
        "type": "function",
        "name": name,
        "description": f"The {name} tool",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "n": {"type": "integer"}},
        },
    }


@pytest.mark.parametrize("model", MODELS)
async def test_tool_call_then_its_output_continues_the_chain(
    stack: Stack, sdk: AsyncOpenAI, model: str
) -> None:
    tools: Any = [search_tool(), {"type": "web_search"}]  # hosted: not offered, no error
    stream = await sdk.responses.create(
        model=model, input=f"#fake call=1 {model}", tools=tools, stream=True
    )
    events = [dumped(event) async for event in stream]
    assert_order(events)
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    first = Response.model_validate(events[-1]["response"])
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "search" and json.loads(call.arguments) == {"query": "tok 0", "n": 0}
    assert call.status == "completed" and call.id
    assert [t.name for t in first.tools] == ["search"]  # type: ignore[union-attr]
    sent = (await stack.upstream_requests())[-1]["body"]
    assert "web_search" not in json.dumps(sent.get("tools"))

    second = await sdk.responses.create(
        model=model,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "42"}],
        tools=tools,
    )
    assert second.status == "completed"
    assert "[tool results: 1]" in second.output_text
    assert second.previous_response_id == first.id
    assert second.conversation is not None and first.conversation is not None
    assert second.conversation.id == first.conversation.id
    third = await sdk.responses.create(
        model=model, previous_response_id=second.id, input="#fake tokens=2"
    )
    assert third.output_text == expected(2)
    # The whole chain reached the model, in order, tool call and output included.
    sent = (await stack.upstream_requests())[-1]["body"]
    flat = json.dumps(sent)
    assert f"#fake call=1 {model}" in flat
    assert "call_fake_0" in flat or "toolu_fake_0" in flat
    assert "42" in flat
    async with httpx.AsyncClient() as http:
        url = f"{stack.base_url}/v1/conversations/{first.conversation.id}"
        detail = (await http.get(url)).json()
    roles = [m["role"] for m in detail["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant", "user", "assistant"]


async def test_namespace_tools_come_back_under_their_declared_names(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    crm: Any = {
        "type": "namespace",
        "name": "crm",
        "description": "Customer records",
        "tools": [
            {
                "type": "function",
                "name": "lookup_customer",
                "description": "Find a customer",
                "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
            }
        ],
    }
    response = await sdk.responses.create(
        model="ollama:fake-model",
        input="#fake call=1",
        tools=[crm],
        store=False,
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert (call.namespace, call.name) == ("crm", "lookup_customer")
    # Echoed as declared (the model saw the flattened name, below).
    assert response.tools[0].name == "lookup_customer"  # type: ignore[union-attr]
    assert response.model_dump()["tools"][0]["namespace"] == "crm"
    # The Codex CLI's next turn: the whole conversation again, store false, its reasoning
    # items replayed with content null, developer instructions, the namespace call.
    followup = await sdk.responses.create(
        model="ollama:fake-model",
        store=False,
        stream=False,
        tools=[crm, {"type": "web_search", "external_web_access": False}],
        tool_choice="auto",
        parallel_tool_calls=False,
        include=["reasoning.encrypted_content"],
        reasoning={"effort": "medium", "summary": "auto"},
        prompt_cache_key="3f2c0e0e-codex-session",
        text={"verbosity": "low"},
        input=cast(
            Any,
            [
                {"type": "message", "role": "developer", "content": "You are Codex."},
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "#fake call=1"}],
                },
                {
                    "type": "reasoning",
                    "id": "rs_1",
                    "summary": [],
                    "content": None,
                    "encrypted_content": None,
                },
                {
                    "type": "function_call",
                    "id": call.id,
                    "call_id": call.call_id,
                    "namespace": "crm",
                    "name": "lookup_customer",
                    "arguments": call.arguments,
                },
                {"type": "function_call_output", "call_id": call.call_id, "output": "Ada"},
            ],
        ),
    )
    assert "[tool results: 1]" in followup.output_text
    sent = (await stack.upstream_requests())[-1]["body"]
    assert sent["messages"][0] == {"role": "system", "content": "You are Codex."}
    assert sent["messages"][2]["tool_calls"][0]["function"]["name"] == "crm__lookup_customer"
    assert sent["messages"][3] == {"role": "tool", "tool_call_id": call.call_id, "content": "Ada"}
    assert [t["function"]["name"] for t in sent["tools"]] == ["crm__lookup_customer"]
    assert sent["parallel_tool_calls"] is False and sent["reasoning_effort"] == "medium"
    assert followup.prompt_cache_key == "3f2c0e0e-codex-session"


@pytest.mark.parametrize("model", MODELS)
async def test_reasoning_as_reasoning_text_or_as_summary(
    stack: Stack, sdk: AsyncOpenAI, model: str
) -> None:
    plain = await sdk.responses.create(model=model, input="#fake think=3 tokens=2", stream=True)
    events = [dumped(event) async for event in plain]
    assert_order(events)
    kinds = {e["type"] for e in events}
    assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds
    assert not any("summary" in kind for kind in kinds)
    final = events[-1]["response"]
    reasoning, message = final["output"]
    assert reasoning["type"] == "reasoning" and reasoning["summary"] == []
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "think0 think1 think2 "}]
    assert message["content"][0]["text"] == expected(2)
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 3

    summary = await sdk.responses.create(
        model=model, input="#fake think=3 tokens=2", reasoning={"summary": "auto"}, stream=True
    )
    events = [dumped(event) async for event in summary]
    assert_order(events)
    order = [e["type"] for e in events]
    assert not any(kind.startswith("response.reasoning_text") for kind in order)
    for kind in (
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
    ):
        assert kind in order
    text = "".join(
        e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta"
    )
    assert text == "think0 think1 think2 "
    reasoning = events[-1]["response"]["output"][0]
    assert reasoning["summary"] == [{"type": "summary_text", "text": text}]


async def test_incomplete_at_max_output_tokens(stack: Stack, sdk: AsyncOpenAI) -> None:
    stream = await sdk.responses.create(
        model="openai-chat:fake-model",
        input="#fake tokens=3 finish=length",
        max_output_tokens=3,
        stream=True,
    )
    events = [dumped(event) async for event in stream]
    assert_order(events)
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["max_output_tokens"] == 3
    assert (await stack.upstream_requests())[-1]["body"]["max_tokens"] == 3


@pytest.mark.parametrize("model", MODELS)
async def test_upstream_failure_mid_stream_is_response_failed(
    stack: Stack, sdk: AsyncOpenAI, model: str
) -> None:
    stream = await sdk.responses.create(model=model, input="#fake tokens=5 midfail=2", stream=True)
    events = [dumped(event) async for event in stream]
    assert_order(events)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["message"]
    assert text_of(events) == expected(2)
    # Before any output (and not streamed), a failure is an HTTP error.
    with pytest.raises(APIStatusError) as caught:
        await sdk.responses.create(model=model, input="#fake status=500")
    assert caught.value.status_code == 502


async def test_context_overflow_is_response_failed_with_its_code(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    stream = await sdk.responses.create(
        model="openai-chat:fake-model", input="#fake overflow", stream=True
    )
    events = [dumped(event) async for event in stream]
    assert_order(events)
    assert events[-2]["type"] == "error" and events[-2]["code"] == "context_length_exceeded"
    assert events[-1]["response"]["error"]["code"] == "context_length_exceeded"
    with pytest.raises(BadRequestError) as caught:
        await sdk.responses.create(model="openai-chat:fake-model", input="#fake overflow")
    assert caught.value.code == "context_length_exceeded"


async def poll(sdk: AsyncOpenAI, response_id: str) -> Response:
    while True:  # bounded by the test timeout
        response = await sdk.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        await asyncio.sleep(0.1)


async def test_background_returns_queued_then_polls_to_completion(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    response = await sdk.responses.create(
        model="ollama:fake-model", input="#fake tokens=8 delay=0.02", background=True
    )
    assert response.status == "queued" and response.background is True
    assert response.output == []
    done = await poll(sdk, response.id)
    assert done.status == "completed" and done.output_text == expected(8)
    assert done.usage is not None and done.usage.output_tokens == 8
    assert done.completed_at is not None
    Response.model_validate(done.model_dump(warnings=False))
    with pytest.raises(BadRequestError) as caught:
        await sdk.responses.create(
            model="ollama:fake-model", input="x", background=True, store=False
        )
    assert caught.value.param == "background"


async def test_retrieve_stream_resumes_after_a_sequence_number(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    first = await sdk.responses.create(
        model="ollama:fake-model", input="#fake tokens=30 delay=0.02", stream=True
    )
    seen: list[dict[str, Any]] = []
    async for event in first:
        seen.append(dumped(event))
        if len(seen) == 8:
            break
    await first.close()
    response_id = seen[0]["response"]["id"]
    rest = await sdk.responses.retrieve(
        response_id, stream=True, starting_after=seen[-1]["sequence_number"]
    )
    later = [dumped(event) async for event in rest]
    whole = seen + later
    assert_order(whole)  # no gap, no duplicate
    assert text_of(whole) == expected(30)
    # From the start, after the end: the same events (a pure function of the generation).
    again = await sdk.responses.retrieve(response_id, stream=True)
    replayed = [dumped(event) async for event in again]
    strip = [{k: v for k, v in e.items() if k != "response"} for e in replayed]
    assert strip == [{k: v for k, v in e.items() if k != "response"} for e in whole]


async def test_cancel_delete_and_input_items(stack: Stack, sdk: AsyncOpenAI) -> None:
    response = await sdk.responses.create(
        model="ollama:fake-model",
        input=[
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": "#fake tokens=400 delay=0.02"},
        ],
        background=True,
    )
    while (await sdk.responses.retrieve(response.id)).status == "queued":
        await asyncio.sleep(0.05)
    cancelled = await sdk.responses.cancel(response.id)
    assert cancelled.status == "cancelled"
    assert (await sdk.responses.cancel(response.id)).status == "cancelled"  # idempotent
    later = await sdk.responses.retrieve(response.id)
    assert later.status == "cancelled"
    # The generation stopped: what it said is a part of the answer, and it says no more.
    assert expected(400).startswith(later.output_text) and later.output_text != expected(400)
    assert later.output_text == cancelled.output_text

    items = await sdk.responses.input_items.list(response.id)
    texts = [cast(Any, item).content[0].text for item in items.data]
    assert texts == ["#fake tokens=400 delay=0.02", "an answer", "first"]
    ascending = await sdk.responses.input_items.list(response.id, order="asc")
    assert [i.id for i in ascending.data] == [i.id for i in reversed(items.data)]

    await sdk.responses.delete(response.id)
    with pytest.raises(NotFoundError):
        await sdk.responses.retrieve(response.id)
    with pytest.raises(BadRequestError) as caught:
        await sdk.responses.create(
            model="ollama:fake-model", input="x", previous_response_id=response.id
        )
    assert caught.value.code == "previous_response_not_found"
    assert caught.value.param == "previous_response_id"


async def test_store_false_keeps_nothing_after_the_end(stack: Stack, sdk: AsyncOpenAI) -> None:
    response = await sdk.responses.create(
        model="ollama:fake-model", input="#fake tokens=3 unstored-marker", store=False
    )
    assert response.model_dump(warnings=False)["store"] is False
    assert response.output_text == expected(3)
    with pytest.raises(NotFoundError):
        await sdk.responses.retrieve(response.id)
    # Its events stay resumable until HAIA_REPLAY_TTL after its end.
    replay = await sdk.responses.retrieve(response.id, stream=True, starting_after=4)
    events = [dumped(event) async for event in replay]  # 4 was the first delta
    assert events[0]["sequence_number"] == 5 and events[-1]["type"] == "response.completed"
    assert text_of(events) == expected(3)[len("tok0 ") :]
    rows = await dbcheck.query(
        stack.database_url,
        "SELECT id FROM haia_message WHERE content LIKE $1 OR completion_id = $2",
        "%unstored-marker%",
        response.id,
    )
    assert rows == []


async def test_store_false_continuing_a_stored_chain_leaves_the_chain_alone(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    first = await sdk.responses.create(model="ollama:fake-model", input="#fake tokens=2 kept")
    assert first.conversation is not None
    second = await sdk.responses.create(
        model="ollama:fake-model",
        input="#fake tokens=3 passing",
        previous_response_id=first.id,
        store=False,
    )
    assert second.output_text == expected(3)
    sent = json.dumps((await stack.upstream_requests())[-1]["body"]["messages"])
    assert "#fake tokens=2 kept" in sent  # the chain reached the model
    rows = await dbcheck.messages(stack.database_url, first.conversation.id)
    assert [r["role"] for r in rows] == ["user", "assistant"]
    assert (await sdk.responses.retrieve(first.id)).output_text == expected(2)


async def test_openwebui_connection_joins_one_conversation_per_chat(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    headers = {"X-OpenWebUI-Chat-Id": "chat-responses-1"}
    first = await sdk.responses.create(
        model="ollama:fake-model", input="#fake tokens=2 hello", extra_headers=headers
    )
    second = await sdk.responses.create(
        model="ollama:fake-model",
        input=[
            {"role": "user", "content": "#fake tokens=2 hello"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "#fake tokens=3 again"},
        ],
        extra_headers=headers,
    )
    assert first.conversation is not None and second.conversation is not None
    assert first.conversation.id == second.conversation.id
    rows = await dbcheck.messages(stack.database_url, first.conversation.id)
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"]
    # A title task is answered, not stored.
    task = await sdk.responses.create(
        model="ollama:fake-model",
        input="### Task:\nGenerate a title. #fake tokens=1",
        extra_headers=headers,
    )
    assert task.output_text and task.status == "completed"
    assert len(await dbcheck.messages(stack.database_url, first.conversation.id)) == 4


PNG_URL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQ"
    "GAhKmMIQAAAABJRU5ErkJggg=="
)


@pytest.mark.parametrize("model", MODELS)
async def test_image_parts_reach_the_model(stack: Stack, sdk: AsyncOpenAI, model: str) -> None:
    response = await sdk.responses.create(
        model=model,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is this"},
                    {"type": "input_image", "image_url": PNG_URL, "detail": "auto"},
                ],
            }
        ],
    )
    assert response.output_text == "Echo: what is this [images: 1]"


async def test_limits_and_bad_input(stack: Stack, sdk: AsyncOpenAI) -> None:
    with pytest.raises(BadRequestError) as caught:
        await sdk.responses.create(
            model="ollama:fake-model",
            input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}],
        )
    assert caught.value.param == "input[0].content[0].type"
    with pytest.raises(BadRequestError) as caught:
        await sdk.responses.create(
            model="ollama:fake-model", input="x", previous_response_id="resp_nope"
        )
    assert caught.value.code == "previous_response_not_found"
    # Unknown fields and `include` are accepted.
    fine = await sdk.responses.create(
        model="ollama:fake-model",
        input="#fake tokens=1",
        include=["reasoning.encrypted_content"],
        extra_body={"some_future_field": {"x": 1}},
    )
    assert fine.status == "completed"


async def test_owners_are_isolated_and_limits_apply(make_stack: StackFactory) -> None:
    stack = make_stack(
        HAIA_API_KEYS="key-one-secret,key-two-secret",
        HAIA_MAX_MESSAGES="3",
        HAIA_REPLAY_TTL="1",
    )
    stack.start_web()
    stack.start_worker()
    base = f"{stack.base_url}/v1"
    async with (
        AsyncOpenAI(base_url=base, api_key="key-one-secret", max_retries=0) as one,
        AsyncOpenAI(base_url=base, api_key="key-two-secret", max_retries=0) as two,
    ):
        mine = await one.responses.create(model="ollama:fake-model", input="#fake tokens=2")
        with pytest.raises(NotFoundError):
            await two.responses.retrieve(mine.id)
        with pytest.raises(NotFoundError):
            await two.responses.cancel(mine.id)
        with pytest.raises(NotFoundError):
            await two.responses.input_items.list(mine.id)
        with pytest.raises(NotFoundError):
            await two.responses.delete(mine.id)
        with pytest.raises(BadRequestError) as caught:
            await two.responses.create(
                model="ollama:fake-model", input="x", previous_response_id=mine.id
            )
        assert caught.value.code == "previous_response_not_found"
        # Once its replay log expired, a response is encoded from what was stored: the same.
        store = aioredis.Redis.from_url(stack.env["HAIA_REDIS_URL"])
        while await store.exists(keys.gen_log(mine.id)):  # bounded by the test timeout
            await asyncio.sleep(0.2)
        await store.aclose()
        again = await one.responses.retrieve(mine.id)
        assert again.output_text == expected(2) and again.status == "completed"
        assert [item.id for item in again.output] == [item.id for item in mine.output]
        replay = await one.responses.retrieve(mine.id, stream=True)
        events = [dumped(event) async for event in replay]
        assert_order(events)
        assert text_of(events) == expected(2)
        # HAIA_MAX_MESSAGES counts input items.
        with pytest.raises(BadRequestError) as caught:
            await one.responses.create(
                model="ollama:fake-model",
                input=[{"role": "user", "content": f"m{i}"} for i in range(4)],
            )
        assert caught.value.param == "input"


async def test_web_sigkill_during_a_background_stream_resumes_with_starting_after(
    make_stack: StackFactory, http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_KEEPALIVE_INTERVAL="0.3", HAIA_WORKER_DEAD_AFTER="3")
    stack.start_web()
    stack.start_worker()
    body = {
        "model": "ollama:fake-model",
        "input": "#fake tokens=80 delay=0.03",
        "stream": True,
        "background": True,
    }
    got = await raw_stream(http, "POST", f"{stack.base_url}/v1/responses", json=body, limit=10)
    seen = events_of(got)
    assert seen[0]["response"]["status"] == "queued"
    assert seen[1]["type"] == "response.queued"
    response_id = seen[0]["response"]["id"]
    assert stack.web is not None
    stack.web.stop(signal.SIGKILL)
    stack.start_web()
    last = seen[-1]["sequence_number"]
    rest = await raw_stream(
        http,
        "GET",
        f"{stack.base_url}/v1/responses/{response_id}",
        params={"stream": "true", "starting_after": str(last)},
    )
    assert rest[-1].data == "[DONE]"
    whole = seen + events_of(rest)
    assert_order(whole)
    assert text_of(whole) == expected(80)
    assert whole[-1]["type"] == "response.completed"
    # Last-Event-ID is honoured the same way.
    tail = await raw_stream(
        http,
        "GET",
        f"{stack.base_url}/v1/responses/{response_id}?stream=true",
        headers={"Last-Event-ID": str(len(whole) - 3)},
    )
    assert [e["sequence_number"] for e in events_of(tail)] == [len(whole) - 2, len(whole) - 1]
