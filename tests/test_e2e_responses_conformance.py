"""Beyond the spec's seven cases: every other shape HAIA's Responses API produces, validated as
strictly as those (tests/responses_spec.py), on an OpenAI-wire and an Anthropic model and both
databases. Reasoning as text and as summary, `incomplete`, `failed` mid-stream, namespace and
hosted tools, `text.format`, background and polling, retrieval, resumed and replayed streams,
cancel, and the request the real Codex CLI sends (captured on the wire in tests/data/).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import Stack
from tests.responses_spec import (
    Stream,
    check_input_items,
    check_response,
    check_stream,
    output_text,
)

pytestmark = pytest.mark.e2e

MODELS = ["ollama:fake-model", "anthropic:claude-fake"]
CODEX_REQUEST = Path(__file__).parent / "data" / "codex-0.171.0-second-turn.json"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"query": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["query", "n"],
}


def expected(tokens: int) -> str:
    return "".join(f"tok{i} " for i in range(tokens))


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": "Bearer sk-conformance"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=60) as client:
        yield client


async def create(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    return check_response(response.text)


async def stream(http: httpx.AsyncClient, **body: Any) -> Stream:
    response = await http.post("/v1/responses", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return check_stream(response.text)


async def retrieve(http: httpx.AsyncClient, response_id: str) -> dict[str, Any]:
    response = await http.get(f"/v1/responses/{response_id}")
    assert response.status_code == 200, response.text
    return check_response(response.text)


async def finished(http: httpx.AsyncClient, response_id: str) -> dict[str, Any]:
    while True:  # bounded by the test timeout
        body = await retrieve(http, response_id)
        if body["status"] not in ("queued", "in_progress"):
            return body
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("model", MODELS)
async def test_reasoning_as_text_and_as_summary(http: httpx.AsyncClient, model: str) -> None:
    plain = await stream(http, model=model, input="#fake think=3 tokens=2")
    assert plain.of_type("response.reasoning_text.delta")
    assert not [t for t in plain.types if "summary" in t]
    reasoning, message = plain.response["output"]
    assert reasoning["type"] == "reasoning" and reasoning["summary"] == []
    assert plain.text() == expected(2) and message["type"] == "message"

    summary = await stream(
        http, model=model, input="#fake think=3 tokens=2", reasoning={"summary": "auto"}
    )
    assert summary.of_type("response.reasoning_summary_text.delta")
    assert not [t for t in summary.types if t.startswith("response.reasoning_text")]
    assert summary.response["output"][0]["summary"] == [
        {"type": "summary_text", "text": "think0 think1 think2 "}
    ]
    assert summary.response["reasoning"]["summary"] == "auto"

    body = await create(
        http, model=model, input="#fake think=2 tokens=1", reasoning={"effort": "low"}
    )
    assert body["output"][0]["type"] == "reasoning"
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == 2


@pytest.mark.parametrize("model", MODELS)
async def test_incomplete_at_max_output_tokens(http: httpx.AsyncClient, model: str) -> None:
    got = await stream(http, model=model, input="#fake tokens=3 finish=length", max_output_tokens=3)
    assert got.types[-1] == "response.incomplete"
    assert got.response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert got.response["max_output_tokens"] == 3
    body = await create(
        http, model=model, input="#fake tokens=3 finish=length", max_output_tokens=3
    )
    assert body["status"] == "incomplete" and body["output"][0]["status"] == "incomplete"


@pytest.mark.parametrize("model", MODELS)
async def test_failed_mid_stream(http: httpx.AsyncClient, model: str) -> None:
    got = await stream(http, model=model, input="#fake tokens=5 midfail=2")
    assert got.types[-2:] == ["error", "response.failed"]
    assert got.response["error"]["message"] and got.response["error"]["code"]
    assert got.text() == expected(2)


NAMESPACED: list[dict[str, Any]] = [
    {
        "type": "namespace",
        "name": "crm",
        "description": "Customer records",
        "tools": [
            {"type": "function", "name": "lookup_customer", "parameters": SCHEMA},
            {"type": "function", "name": "list_orders", "parameters": SCHEMA},
        ],
    },
    {"type": "web_search", "external_web_access": False},
    {"type": "function", "name": "plain", "description": "A plain one", "parameters": SCHEMA},
]


@pytest.mark.parametrize("model", MODELS)
async def test_namespace_calls_and_hosted_tools(http: httpx.AsyncClient, model: str) -> None:
    got = await stream(http, model=model, input="#fake call=1", tools=NAMESPACED)
    [call] = [i for i in got.response["output"] if i["type"] == "function_call"]
    assert (call.get("namespace"), call["name"]) == ("crm", "lookup_customer")
    assert json.loads(call["arguments"]) == {"query": "tok 0", "n": 0}
    assert len(got.response["tools"]) == 3  # the functions, flattened; not the hosted one
    body = await create(http, model=model, input="#fake call=2", tools=NAMESPACED)
    assert [i["name"] for i in body["output"] if i["type"] == "function_call"] == [
        "lookup_customer",
        "list_orders",
    ]


@pytest.mark.parametrize("model", MODELS)
async def test_the_tools_echo_names_functions_as_declared(
    http: httpx.AsyncClient, model: str
) -> None:
    """A namespace's function is `lookup_customer` (in `crm`) to the client, in its calls and in
    the response's `tools` alike: the name the model saw upstream is HAIA's own business."""
    body = await create(http, model=model, input="#fake tokens=1", tools=NAMESPACED)
    names = sorted(tool["name"] for tool in body["tools"])
    assert names == ["list_orders", "lookup_customer", "plain"]


@pytest.mark.parametrize("model", MODELS)
async def test_json_object_format_is_echoed(http: httpx.AsyncClient, model: str) -> None:
    body = await create(
        http, model=model, input="#fake tokens=2", text={"format": {"type": "json_object"}}
    )
    assert body["text"]["format"] == {"type": "json_object"}


@pytest.mark.parametrize("model", MODELS)
async def test_json_schema_format_is_echoed_as_the_spec_requires(
    http: httpx.AsyncClient, model: str
) -> None:
    """The spec's `JsonSchemaResponseFormat` requires `description` (null allowed) and
    `strict`, even when the request left them out."""
    schema = {"type": "object", "properties": {"title": {"type": "string"}}}
    json_schema = {"type": "json_schema", "name": "t", "schema": schema}
    body = await create(http, model=model, input="#fake tokens=2", text={"format": json_schema})
    assert body["text"]["format"]["type"] == "json_schema"
    assert body["text"]["format"]["schema"] == schema


@pytest.mark.parametrize("model", MODELS)
async def test_background_polled_retrieved_and_replayed(
    http: httpx.AsyncClient, model: str
) -> None:
    queued = await create(
        http, model=model, input="#fake tokens=12 delay=0.01 think=2", background=True
    )
    assert queued["status"] == "queued" and queued["background"] is True
    done = await finished(http, queued["id"])
    assert done["status"] == "completed" and done["completed_at"] is not None
    replay = await replayed(http, queued["id"])
    assert unstamped(replay.response) == unstamped(done)
    assert replay.text() == expected(12)
    for after in (0, 3, len(replay.events) - 3):
        tail = await replayed(http, queued["id"], starting_after=after)
        assert unstamped(tail.events) == unstamped(replay.events[after + 1 :])
    by_header = await replayed(http, queued["id"], last_event_id=3)
    assert unstamped(by_header.events) == unstamped(replay.events[4:])


@pytest.mark.parametrize("model", MODELS)
async def test_a_replay_keeps_the_time_the_response_ended(
    http: httpx.AsyncClient, model: str
) -> None:
    """`completed_at` is when the response ended, in GET and in every replay alike: a replay
    re-encodes the stored events, it must not restamp them with its own clock."""
    queued = await create(http, model=model, input="#fake tokens=3", background=True)
    done = await finished(http, queued["id"])
    await asyncio.sleep(1.1)  # the wall clock moves on past the second the response ended
    assert (await replayed(http, queued["id"])).response == done
    assert (await replayed(http, queued["id"], starting_after=2)).response == done


async def replayed(
    http: httpx.AsyncClient,
    response_id: str,
    *,
    starting_after: int | None = None,
    last_event_id: int | None = None,
) -> Stream:
    """`GET /v1/responses/{id}?stream=true`, from the start or resumed, strictly checked."""
    params = {"stream": "true"}
    if starting_after is not None:
        params["starting_after"] = str(starting_after)
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    response = await http.get(f"/v1/responses/{response_id}", params=params, headers=headers)
    assert response.status_code == 200, response.text
    resumed = starting_after if starting_after is not None else last_event_id
    return check_stream(response.text, starting_after=resumed)


def unstamped(value: Any) -> Any:
    """`value` without `completed_at` anywhere (see the test of it above)."""
    if isinstance(value, dict):
        return {k: unstamped(v) for k, v in value.items() if k != "completed_at"}
    if isinstance(value, list):
        return [unstamped(v) for v in value]
    return value


@pytest.mark.parametrize("model", MODELS)
async def test_cancelled_response_is_valid(http: httpx.AsyncClient, model: str) -> None:
    queued = await create(http, model=model, input="#fake tokens=200 delay=0.05", background=True)
    cancelled = await http.post(f"/v1/responses/{queued['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert check_response(cancelled.text)["status"] == "cancelled"
    assert (await finished(http, queued["id"]))["status"] == "cancelled"


@pytest.mark.parametrize("model", MODELS)
async def test_a_chain_with_a_tool_call_and_its_items(http: httpx.AsyncClient, model: str) -> None:
    tool = {"type": "function", "name": "search", "description": "Search", "parameters": SCHEMA}
    first = await create(http, model=model, input="find it #fake call=1", tools=[tool])
    [call] = [item for item in first["output"] if item["type"] == "function_call"]
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "found"}
    second = await create(
        http, model=model, previous_response_id=first["id"], input=[output], tools=[tool]
    )
    assert second["previous_response_id"] == first["id"]
    assert output_text(second) == "Echo: find it [tool results: 1]"
    for order in ("asc", "desc"):
        listing = await http.get(f"/v1/responses/{second['id']}/input_items?order={order}")
        assert listing.status_code == 200, listing.text
        items = check_input_items(listing.text)["data"]
        assert [item["type"] for item in items] == ["function_call_output"]


@pytest.mark.parametrize("model", MODELS)
async def test_the_codex_cli_request_as_captured(
    stack: Stack, http: httpx.AsyncClient, model: str
) -> None:
    captured = json.loads(CODEX_REQUEST.read_text())
    body = {**captured["body"], "model": model}
    headers = {k: v for k, v in captured["headers"].items() if k.lower() != "accept-encoding"}
    response = await http.post("/v1/responses", json=body, headers=headers)
    assert response.status_code == 200, response.text
    got = check_stream(response.text)
    assert got.text().endswith("run the marker command [tool results: 1]")
    assert got.response["store"] is False
    sent = (await stack.upstream_requests())[-1]["body"]
    wire = json.dumps(sent)
    assert "You are a coding agent running in the Codex CLI" in wire  # its developer messages
    assert "haia-marker-123" in wire  # the function_call_output
    assert "exec_command" in wire and '"web_search"' not in wire
    # Stateless as asked: not retrievable.
    assert (await http.get(f"/v1/responses/{got.response['id']}")).status_code == 404
