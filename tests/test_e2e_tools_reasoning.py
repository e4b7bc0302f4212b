"""Tool calls and reasoning through HAIA, for an OpenAI-wire model (Ollama's `/v1`) and an
Anthropic model, driven with the `openai` SDK: streamed, assembled, stored, sent back."""

from __future__ import annotations

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

MODELS = ["ollama:fake-model", "anthropic:claude-fake"]


def tool(name: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {name} tool",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "n": {"type": "integer"}},
            },
        },
    }


TOOLS = [tool("search"), tool("lookup")]


@pytest.fixture
async def sdk(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


def upstream_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    return list(request["body"]["messages"])


@pytest.mark.parametrize("model", MODELS)
async def test_parallel_tool_calls_stream_in_the_openai_shape_and_loop_back(
    stack: Stack, sdk: AsyncOpenAI, model: str
) -> None:
    prompt = f"#fake call=2 {model}"
    async with sdk.chat.completions.stream(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        tools=TOOLS,  # type: ignore[arg-type]
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["search", "lookup"]
    assert [json.loads(c.function.arguments) for c in calls] == [
        {"query": "tok 0", "n": 0},
        {"query": "tok 1", "n": 1},
    ]
    assert all(c.id for c in calls) and len({c.id for c in calls}) == 2
    [row] = await dbcheck.query(
        stack.database_url,
        "SELECT tool_calls FROM haia_message WHERE completion_id = $1",
        final.id,
    )
    stored = json.loads(row["tool_calls"])
    assert [s["id"] for s in stored] == [c.id for c in calls]

    # The client runs its tools and sends the results back with the whole history.
    history: list[Any] = [
        {"role": "user", "content": prompt},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": c.id, "type": "function", "function": c.function.model_dump()} for c in calls
            ],
        },
        *(
            {"role": "tool", "tool_call_id": c.id, "content": f"result {i}"}
            for i, c in enumerate(calls)
        ),
    ]
    await stack.forget_upstream_requests()
    raw = await sdk.chat.completions.with_raw_response.create(
        model=model,
        messages=history,
        tools=TOOLS,  # type: ignore[arg-type]
    )
    answer = raw.parse()
    assert answer.choices[0].finish_reason == "stop"
    assert "[tool results: 2]" in (answer.choices[0].message.content or "")
    [sent] = await stack.upstream_requests()
    if model.startswith("anthropic"):
        messages = upstream_messages(sent)
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        uses = [b for b in messages[1]["content"] if b["type"] == "tool_use"]
        results = [b for b in messages[2]["content"] if b["type"] == "tool_result"]
        assert (
            [u["id"] for u in uses] == [r["tool_use_id"] for r in results] == [c.id for c in calls]
        )
    else:
        roles = [m["role"] for m in upstream_messages(sent) if m["role"] != "system"]
        assert roles == ["user", "assistant", "tool", "tool"]
    rows = await dbcheck.messages(stack.database_url, raw.headers["x-conversation-id"])
    assert [r["role"] for r in rows] == ["user", "assistant", "tool", "tool", "assistant"]


@pytest.mark.parametrize("model", MODELS)
async def test_reasoning_streams_before_the_answer_and_is_kept_apart(
    stack: Stack, sdk: AsyncOpenAI, model: str
) -> None:
    prompt = f"#fake think=3 tokens=2 {model}"
    stream = await sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], stream=True
    )
    kinds: list[str] = []
    reasoning, content = "", ""
    async for chunk in stream:
        if not chunk.choices:
            continue
        delta: Any = chunk.choices[0].delta
        thought = (delta.model_extra or {}).get("reasoning_content")
        if thought:
            kinds.append("reasoning")
            reasoning += thought
        if delta.content:
            kinds.append("content")
            content += delta.content
    assert reasoning == "think0 think1 think2 "
    assert content == "tok0 tok1 "
    assert kinds.index("content") > max(i for i, k in enumerate(kinds) if k == "reasoning")

    raw = await sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt + " again"}]
    )
    message: Any = raw.parse().choices[0].message
    assert (message.model_extra or {}).get("reasoning_content") == "think0 think1 think2 "
    assert message.content == "tok0 tok1 "
    conversation_id = raw.headers["x-conversation-id"]
    rows = await dbcheck.query(
        stack.database_url,
        "SELECT content, reasoning FROM haia_message WHERE conversation_id = $1 "
        "AND role = 'assistant'",
        conversation_id,
    )
    assert rows == [{"content": "tok0 tok1 ", "reasoning": "think0 think1 think2 "}]

    # The next turn: the thinking never goes back as content.
    await stack.forget_upstream_requests()
    await sdk.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "next"}],
        extra_headers={"X-Conversation-ID": conversation_id},
    )
    [sent] = await stack.upstream_requests()
    as_content = [
        block if isinstance(block, str) else block.get("text", "")
        for message in upstream_messages(sent)
        for block in (
            message["content"] if isinstance(message["content"], list) else [message["content"]]
        )
        if isinstance(block, str) or block.get("type") != "thinking"
    ]
    assert "think0" not in json.dumps(as_content)  # Claude's signed blocks may go back as such


async def test_ollama_reasoning_field_maps_to_reasoning_content(stack: Stack) -> None:
    body = {
        "model": "ollama:fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": "#fake think=2 field=reasoning tokens=1"}],
    }
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) as response,
    ):
        frames = await read_all(response)
    deltas = [f.json()["choices"][0]["delta"] for f in frames if f.data and "choices" in f.data]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "think0 think1 "
    assert all(f.id is not None for f in frames if f.data and f.data != "[DONE]")


async def test_anthropic_signed_thinking_goes_back_with_its_turn_in_a_tool_loop(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    prompt = "#fake think=2 call=1 signed"
    raw = await sdk.chat.completions.with_raw_response.create(
        model="anthropic:claude-fake",
        messages=[{"role": "user", "content": prompt}],
        tools=[TOOLS[0]],  # type: ignore[list-item]
    )
    first = raw.parse()
    call: Any = (first.choices[0].message.tool_calls or [])[0]
    await stack.forget_upstream_requests()
    await sdk.chat.completions.create(
        model="anthropic:claude-fake",
        messages=[
            {"role": "user", "content": prompt},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": call.id, "type": "function", "function": call.function.model_dump()}
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "found it"},
        ],
        tools=[TOOLS[0]],  # type: ignore[list-item]
    )
    [sent] = await stack.upstream_requests()
    assistant = upstream_messages(sent)[1]
    thinking = [b for b in assistant["content"] if b["type"] == "thinking"]
    assert thinking == [
        {"type": "thinking", "thinking": "think0 think1 ", "signature": "sig-fake-2"}
    ]
