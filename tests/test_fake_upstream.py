"""The fake upstream itself, driven by the official `openai` and `anthropic` SDKs.

If the SDKs assemble what the fake streams (tool calls, reasoning, thinking with its signature,
tool_use input), the fake speaks the wire as the real providers do, and HAIA's end-to-end tests
against it mean something.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic import AsyncAnthropic
from anthropic.types import MessageParam, ToolParam
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"query": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["query", "n"],
    "additionalProperties": False,
}
OPENAI_TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {"name": name, "description": name, "parameters": SCHEMA, "strict": True},
    }
    for name in ("search", "lookup", "unused")
]
ANTHROPIC_TOOLS: list[ToolParam] = [
    {"name": name, "description": name, "input_schema": SCHEMA} for name in ("search", "lookup")
]
PIXEL = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAA"
    "BJRU5ErkJggg=="
)


@pytest.fixture
async def oai(fake_upstream: str) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=f"{fake_upstream}/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def claude(fake_upstream: str) -> AsyncIterator[AsyncAnthropic]:
    async with AsyncAnthropic(base_url=fake_upstream, api_key="x", max_retries=0) as client:
        yield client


def user(content: Any) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": content}]


# --- OpenAI Chat Completions ----------------------------------------------------------------


async def test_openai_stream_helper_assembles_parallel_tool_calls_and_reasoning(
    oai: AsyncOpenAI,
) -> None:
    reasoning: list[str] = []
    order: list[str] = []
    async with oai.chat.completions.stream(
        model="fake-model",
        messages=user("find it #fake think=3 call=2 delay=0.001"),
        tools=OPENAI_TOOLS,
        stream_options={"include_usage": True},
    ) as stream:
        async for event in stream:
            if event.type == "chunk" and event.chunk.choices:
                delta = event.chunk.choices[0].delta
                if (delta.model_extra or {}).get("reasoning_content"):
                    reasoning.append(delta.model_extra["reasoning_content"])  # type: ignore[index]
                    order.append("reasoning")
                if delta.tool_calls:
                    order.append("tool_call")
            if event.type == "content.delta":
                assert event.delta == ""  # only the role chunk's empty content
        final = await stream.get_final_completion()
    assert reasoning == ["think0 ", "think1 ", "think2 "]
    assert order.index("tool_call") > order.index("reasoning")
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    calls = choice.message.tool_calls or []
    assert [(c.id, c.type, c.function.name) for c in calls] == [
        ("call_fake_0", "function", "search"),
        ("call_fake_1", "function", "lookup"),
    ]
    for i, call in enumerate(calls):
        assert json.loads(call.function.arguments) == {"query": f"tok {i}", "n": i}
        assert call.function.parsed_arguments == {"query": f"tok {i}", "n": i}
    assert final.usage is not None
    assert final.usage.completion_tokens_details is not None
    assert final.usage.completion_tokens_details.reasoning_tokens == 3


async def test_openai_tool_call_arguments_arrive_in_pieces(fake_upstream: str) -> None:
    body = {
        "model": "fake-model",
        "stream": True,
        "tools": OPENAI_TOOLS,
        "messages": user("#fake call=1"),
    }
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{fake_upstream}/v1/chat/completions", json=body)
    chunks = [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")
    ]
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert calls[0]["id"] == "call_fake_0" and calls[0]["function"]["name"] == "search"
    pieces = [c["function"]["arguments"] for c in calls[1:]]
    assert 3 <= len(pieces) <= 4 and all("id" not in c for c in calls[1:])
    assert json.loads("".join(pieces)) == {"query": "tok 0", "n": 0}
    assert not any("content" in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    assert response.text.endswith("data: [DONE]\n\n")


async def test_openai_non_stream_tool_calls_and_reasoning_field(oai: AsyncOpenAI) -> None:
    completion = await oai.chat.completions.create(
        model="fake-model",
        messages=user("#fake think=2 field=reasoning call=1"),
        tools=OPENAI_TOOLS,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert (choice.message.model_extra or {}).get("reasoning") == "think0 think1 "
    assert "reasoning_content" not in (choice.message.model_extra or {})
    [call] = choice.message.tool_calls or []
    assert call.id == "call_fake_0" and call.type == "function"
    assert call.function.name == "search"
    assert json.loads(call.function.arguments) == {"query": "tok 0", "n": 0}


async def test_openai_reasoning_content_then_text(oai: AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="fake-model", messages=user("hello #fake think=2"), stream=True
    )
    kinds: list[tuple[str, str]] = []
    async for chunk in stream:
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            if extra.get("reasoning_content"):
                kinds.append(("reasoning", extra["reasoning_content"]))
            if choice.delta.content:
                kinds.append(("content", choice.delta.content))
    assert kinds == [
        ("reasoning", "think0 "),
        ("reasoning", "think1 "),
        ("content", "Echo:"),
        ("content", " hello"),
    ]
    completion = await oai.chat.completions.create(
        model="fake-model", messages=user("hello #fake think=1")
    )
    message = completion.choices[0].message
    assert (message.model_extra or {}).get("reasoning_content") == "think0 "
    assert message.content == "Echo: hello"


async def test_openai_images_are_counted(oai: AsyncOpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}
    url_image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    content = [
        {"type": "text", "text": "what is"},
        image,
        {"type": "text", "text": "this"},
        url_image,
    ]
    completion = await oai.chat.completions.create(model="fake-model", messages=user(content))
    assert completion.choices[0].message.content == "Echo: what is this [images: 2]"


async def test_openai_tool_results_get_an_answer_not_another_call(oai: AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "go #fake call=2"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"call_fake_{i}",
                    "type": "function",
                    "function": {"name": name, "arguments": "{}"},
                }
                for i, name in enumerate(("search", "lookup"))
            ],
        },
        {"role": "tool", "tool_call_id": "call_fake_0", "content": "found"},
        {"role": "tool", "tool_call_id": "call_fake_1", "content": "looked"},
    ]
    completion = await oai.chat.completions.create(
        model="fake-model", messages=messages, tools=OPENAI_TOOLS
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content == "Echo: go [tool results: 2]"


async def test_openai_too_few_tools_is_a_400(oai: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await oai.chat.completions.create(
            model="fake-model", messages=user("#fake call=4"), tools=OPENAI_TOOLS, stream=True
        )
    assert raised.value.status_code == 400
    assert raised.value.param == "tools" and raised.value.type == "invalid_request_error"


async def test_openai_finish_length(oai: AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="fake-model", messages=user("#fake tokens=3 finish=length"), stream=True
    )
    finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert finishes[-1] == "length"
    completion = await oai.chat.completions.create(
        model="fake-model", messages=user("#fake tokens=3 finish=length")
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "tok0 tok1 tok2 "


async def test_openai_midfail_is_an_error_chunk(oai: AsyncOpenAI, fake_upstream: str) -> None:
    got: list[str] = []
    stream = await oai.chat.completions.create(
        model="fake-model", messages=user("#fake tokens=10 midfail=3"), stream=True
    )

    async def read() -> None:
        async for chunk in stream:
            got.extend(c.delta.content or "" for c in chunk.choices)

    with pytest.raises(openai.APIError, match="fake mid-stream failure"):
        await read()
    assert "".join(got) == "tok0 tok1 tok2 "
    body = {"model": "fake-model", "stream": True, "messages": user("#fake tokens=10 midfail=3")}
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{fake_upstream}/v1/chat/completions", json=body)
    events = response.text.split("\n\n")
    error = json.loads(events[-3].removeprefix("data: "))
    assert error == {
        "error": {
            "message": "fake mid-stream failure",
            "type": "api_error",
            "param": None,
            "code": None,
        }
    }
    assert events[-2] == "data: [DONE]"


async def test_openai_default_answer_and_usage_are_unchanged(oai: AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="fake-model",
        messages=user("plain words"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: plain words"
    assert [c.usage is None for c in chunks] == [True] * (len(chunks) - 1) + [False]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


# --- Anthropic Messages ---------------------------------------------------------------------


async def test_anthropic_stream_accumulates_thinking_text_and_tool_use(
    claude: AsyncAnthropic,
) -> None:
    kinds: list[str] = []
    async with claude.messages.stream(
        model="claude-fake",
        max_tokens=1024,
        messages=[{"role": "user", "content": "look up #fake think=2 call=2 tokens=2"}],
        tools=ANTHROPIC_TOOLS,
    ) as stream:
        async for event in stream:
            kinds.append(event.type)
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "signature" in kinds and "input_json" in kinds
    assert final.id.startswith("msg_fake") and final.role == "assistant"
    assert final.stop_reason == "tool_use"
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    thinking, text, *calls = final.content
    assert thinking.type == "thinking"
    assert thinking.thinking == "think0 think1 " and thinking.signature == "sig-fake-2"
    assert text.type == "text" and text.text == "tok0 tok1 "
    for i, (call, name) in enumerate(zip(calls, ("search", "lookup"), strict=True)):
        assert call.type == "tool_use"
        assert (call.id, call.name) == (f"toolu_fake_{i}", name)
        assert call.input == {"query": f"tok {i}", "n": i}
    assert final.usage.input_tokens > 0
    assert final.usage.output_tokens == 2 + 2 + len(calls) * 4


async def test_anthropic_non_stream_message(claude: AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model="claude-fake",
        max_tokens=1024,
        messages=[{"role": "user", "content": "hi #fake think=1 call=1"}],
        tools=ANTHROPIC_TOOLS,
    )
    assert message.type == "message" and message.stop_reason == "tool_use"
    assert message.stop_sequence is None
    thinking, call = message.content
    assert thinking.type == "thinking" and thinking.signature == "sig-fake-1"
    assert call.type == "tool_use" and call.input == {"query": "tok 0", "n": 0}
    plain = await claude.messages.create(
        model="claude-fake", max_tokens=10, messages=[{"role": "user", "content": "plain"}]
    )
    assert plain.stop_reason == "end_turn"
    assert [(b.type, getattr(b, "text", None)) for b in plain.content] == [("text", "Echo: plain")]


async def test_anthropic_images_and_tool_results(claude: AsyncAnthropic) -> None:
    image: Any = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": PIXEL},
    }
    message = await claude.messages.create(
        model="claude-fake",
        max_tokens=100,
        messages=[{"role": "user", "content": [{"type": "text", "text": "see"}, image, image]}],
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "Echo: see [images: 2]"
    history: list[MessageParam] = [
        {"role": "user", "content": "go #fake call=1"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_fake_0", "name": "search", "input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_fake_0", "content": "ok"}],
        },
    ]
    async with claude.messages.stream(
        model="claude-fake", max_tokens=100, messages=history, tools=ANTHROPIC_TOOLS
    ) as stream:
        answer = await stream.get_final_message()
    assert answer.stop_reason == "end_turn"
    assert [(b.type, getattr(b, "text", None)) for b in answer.content] == [
        ("text", "Echo: go [tool results: 1]")
    ]


async def test_anthropic_finish_length(claude: AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model="claude-fake",
        max_tokens=3,
        messages=[{"role": "user", "content": "#fake tokens=3 finish=length"}],
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "max_tokens"


@pytest.mark.parametrize(
    ("status", "kind", "error"),
    [
        (400, "invalid_request_error", anthropic.BadRequestError),
        (401, "authentication_error", anthropic.AuthenticationError),
        (404, "not_found_error", anthropic.NotFoundError),
        (429, "rate_limit_error", anthropic.RateLimitError),
        (500, "api_error", anthropic.InternalServerError),
        (529, "overloaded_error", anthropic.APIStatusError),
    ],
)
async def test_anthropic_status_errors(
    claude: AsyncAnthropic, status: int, kind: str, error: type[anthropic.APIStatusError]
) -> None:
    with pytest.raises(error) as raised:
        await claude.messages.create(
            model="claude-fake",
            max_tokens=10,
            messages=[{"role": "user", "content": f"#fake status={status} retry_after=7"}],
        )
    assert raised.value.status_code == status
    assert raised.value.body == {
        "type": "error",
        "error": {"type": kind, "message": f"fake error {status}"},
        "request_id": "req_fake",
    }
    assert raised.value.response.headers["retry-after"] == "7"


async def test_anthropic_fail_then_succeed(claude: AsyncAnthropic) -> None:
    content = "#fake status=529 fail=1 tokens=2"
    with pytest.raises(anthropic.APIStatusError):
        await claude.messages.create(
            model="claude-fake", max_tokens=10, messages=[{"role": "user", "content": content}]
        )
    message = await claude.messages.create(
        model="claude-fake", max_tokens=10, messages=[{"role": "user", "content": content}]
    )
    assert message.content[0].type == "text" and message.content[0].text == "tok0 tok1 "


async def test_anthropic_midfail_is_an_error_event(claude: AsyncAnthropic) -> None:
    got: list[str] = []

    async def read() -> None:
        async with claude.messages.stream(
            model="claude-fake",
            max_tokens=100,
            messages=[{"role": "user", "content": "#fake tokens=6 midfail=2"}],
        ) as stream:
            async for text in stream.text_stream:
                got.append(text)

    with pytest.raises(anthropic.APIStatusError) as raised:
        await read()
    assert got == ["tok0 ", "tok1 "]
    assert raised.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "fake mid-stream failure"},
        "request_id": "req_fake",
    }


async def test_anthropic_invalid_requests(claude: AsyncAnthropic, fake_upstream: str) -> None:
    with pytest.raises(anthropic.BadRequestError, match="declares 2 tools"):
        await claude.messages.create(
            model="claude-fake",
            max_tokens=10,
            messages=[{"role": "user", "content": "#fake call=3"}],
            tools=ANTHROPIC_TOOLS,
        )
    body = {"model": "claude-fake", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{fake_upstream}/v1/messages", json=body)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }


async def test_models_in_both_shapes(
    claude: AsyncAnthropic, oai: AsyncOpenAI, fake_upstream: str
) -> None:
    page = await claude.models.list()
    [model] = page.data
    assert (model.id, model.display_name, model.type) == ("claude-fake", "Claude Fake", "model")
    assert [m.id async for m in oai.models.list()] == ["fake-model"]
    async with httpx.AsyncClient() as http:
        plain = (await http.get(f"{fake_upstream}/v1/models")).json()
    assert plain == {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}


async def test_both_wires_are_recorded(
    claude: AsyncAnthropic, oai: AsyncOpenAI, fake_upstream: str
) -> None:
    async with httpx.AsyncClient() as http:
        await http.delete(f"{fake_upstream}/_requests")
        await oai.chat.completions.create(model="fake-model", messages=user("one"), seed=7)
        await claude.messages.create(
            model="claude-fake",
            max_tokens=33,
            system="be brief",
            messages=[{"role": "user", "content": "two"}],
        )
        recorded = (await http.get(f"{fake_upstream}/_requests")).json()
    assert [r["path"] for r in recorded] == ["/v1/chat/completions", "/v1/messages"]
    assert recorded[0]["body"]["seed"] == 7
    assert recorded[1]["body"]["max_tokens"] == 33 and recorded[1]["body"]["system"] == "be brief"
    headers = recorded[1]["headers"]  # the key, as `x-api-key` or (newer SDKs) a Bearer token
    assert headers.get("x-api-key") == "x" or headers.get("authorization") == "Bearer x"
    assert "anthropic-version" in recorded[1]["headers"]


# --- script rules ---------------------------------------------------------------------------

WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {"location": {"type": "string"}},
    "required": ["location"],
}
MARKER_RULES: list[dict[str, Any]] = [
    {
        "match": "script marker-77 please",
        "think": "I will run it.",
        "calls": [{"name": "run", "arguments": {"cmd": "echo marker-77"}}],
    },
    {
        "match": "script marker-77 please",
        "after": "marker-77",
        "think": "It printed the marker.",
        "text": "The output was marker-77",
    },
]


@pytest.fixture
async def script(fake_upstream: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake_upstream) as http:
        for rule in MARKER_RULES:
            assert (await http.post("/_script", json=rule)).status_code == 200
        yield http
        await http.delete("/_script")


async def test_a_script_rule_calls_the_tool_then_answers_once_its_result_is_in_openai(
    script: httpx.AsyncClient, oai: AsyncOpenAI
) -> None:
    tools: list[ChatCompletionToolParam] = [
        {"type": "function", "function": {"name": "other", "parameters": SCHEMA}},
        {"type": "function", "function": {"name": "run", "parameters": WEATHER}},
    ]
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "be a coder"},
        {"role": "user", "content": "script marker-77 please"},
    ]
    async with oai.chat.completions.stream(
        model="fake-model", messages=messages, tools=tools
    ) as stream:
        first = await stream.get_final_completion()
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert (message.model_extra or {}).get("reasoning_content") == "I will run it."
    [call] = message.tool_calls or []
    assert call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "run",
        {"cmd": "echo marker-77"},
    )
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},  # type: ignore[list-item]
        {"role": "tool", "tool_call_id": call.id, "content": "marker-77\n"},
    ]
    second = await oai.chat.completions.create(model="fake-model", messages=messages, tools=tools)
    assert second.choices[0].message.content == "The output was marker-77"
    assert (second.choices[0].message.model_extra or {}).get("reasoning_content") == (
        "It printed the marker."
    )
    messages[-1]["content"] = "something else"
    third = await oai.chat.completions.create(model="fake-model", messages=messages, tools=tools)
    assert third.choices[0].message.content == "Echo: script marker-77 please [tool results: 1]"


async def test_a_script_rule_calls_the_tool_then_answers_in_anthropic(
    script: httpx.AsyncClient, claude: AsyncAnthropic
) -> None:
    tools: list[ToolParam] = [{"name": "run", "description": "run", "input_schema": WEATHER}]
    history: list[MessageParam] = [{"role": "user", "content": "script marker-77 please"}]
    async with claude.messages.stream(
        model="claude-fake", max_tokens=100, messages=history, tools=tools
    ) as stream:
        first = await stream.get_final_message()
    assert first.stop_reason == "tool_use"
    thinking, call = first.content
    assert thinking.type == "thinking" and thinking.thinking == "I will run it."
    assert call.type == "tool_use" and (call.name, call.input) == ("run", {"cmd": "echo marker-77"})
    assistant: Any = {"role": "assistant", "content": [b.model_dump() for b in first.content]}
    history += [
        assistant,
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": [{"type": "text", "text": "marker-77"}],
                }
            ],
        },
    ]
    second = await claude.messages.create(
        model="claude-fake", max_tokens=100, messages=history, tools=tools
    )
    assert [(b.type, getattr(b, "text", None)) for b in second.content] == [
        ("thinking", None),
        ("text", "The output was marker-77"),
    ]


async def test_a_script_call_of_an_undeclared_tool_is_a_400_and_bad_rules_are_refused(
    script: httpx.AsyncClient, oai: AsyncOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError, match="does not declare it"):
        await oai.chat.completions.create(
            model="fake-model", messages=user("script marker-77 please"), tools=OPENAI_TOOLS
        )
    assert (await script.post("/_script", json={"match": "x", "nope": 1})).status_code == 400
