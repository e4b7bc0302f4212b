"""Conversations as OpenWebUI and API users hold them, on both databases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests import dbcheck
from tests.procs import Stack

pytestmark = pytest.mark.e2e

Msg = dict[str, Any]
TITLE_TASK = (
    "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
    '### Output:\nJSON format: { "title": "your concise title here" }\n### Chat History:\n'
)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def chat(
    http: httpx.AsyncClient,
    stack: Stack,
    messages: list[Msg],
    *,
    stream: bool = True,
    headers: dict[str, str] | None = None,
    status: int = 200,
) -> tuple[str, str]:
    """One turn; returns (conversation id, answer)."""
    body = {"model": "ollama:fake-model", "messages": messages, "stream": stream}
    url = f"{stack.base_url}/v1/chat/completions"
    if not stream:
        response = await http.post(url, json=body, headers=headers or {})
        assert response.status_code == status, response.text
        data = response.json()
        return response.headers.get("x-conversation-id", ""), data["choices"][0]["message"][
            "content"
        ] if status == 200 else ""
    answer = ""
    async with http.stream("POST", url, json=body, headers=headers or {}) as response:
        assert response.status_code == status, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                import json

                for choice in json.loads(line[6:])["choices"]:
                    answer += choice["delta"].get("content") or ""
        return response.headers["x-conversation-id"], answer


def user(text: str) -> Msg:
    return {"role": "user", "content": text}


def assistant(text: str) -> Msg:
    return {"role": "assistant", "content": text}


async def stored(stack: Stack, conversation_id: str) -> list[tuple[str, str]]:
    return [
        (r["role"], r["content"])
        for r in await dbcheck.messages(stack.database_url, conversation_id)
    ]


async def test_openwebui_turns_give_one_conversation_without_duplicates(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    headers = {"X-OpenWebUI-Chat-Id": "owui-chat-1", "X-OpenWebUI-User-Id": "u-42"}
    history: list[Msg] = [{"role": "system", "content": "Be brief."}]
    ids = set()
    for turn in range(3):
        history.append(user(f"question {turn}"))
        conversation_id, answer = await chat(http, stack, history, headers=headers)
        history.append(assistant(answer))
        ids.add(conversation_id)
    # The same chat, now without the chat id header: found by its history.
    history.append(user("question 3"))
    conversation_id, answer = await chat(
        http, stack, history, headers={"X-OpenWebUI-User-Id": "u-42"}
    )
    ids.add(conversation_id)
    assert len(ids) == 1
    rows = await stored(stack, conversation_id)
    assert rows == [
        ("system", "Be brief."),
        ("user", "question 0"),
        ("assistant", "Echo: question 0"),
        ("user", "question 1"),
        ("assistant", "Echo: question 1"),
        ("user", "question 2"),
        ("assistant", "Echo: question 2"),
        ("user", "question 3"),
        ("assistant", "Echo: question 3"),
    ]


async def test_regenerate_keeps_the_old_answer_in_a_linked_conversation(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    headers = {"X-OpenWebUI-Chat-Id": "owui-regen"}
    first, a1 = await chat(http, stack, [user("r1")], headers=headers)
    _, _a2 = await chat(http, stack, [user("r1"), assistant(a1), user("r2")], headers=headers)
    # Regenerate the second answer: OpenWebUI resends the history without it.
    await stack.forget_upstream_requests()
    branch, a2_again = await chat(
        http, stack, [user("r1"), assistant(a1), user("r2 #fake tokens=2")], headers=headers
    )
    assert branch != first
    assert await stored(stack, first) == [
        ("user", "r1"),
        ("assistant", "Echo: r1"),
        ("user", "r2"),
        ("assistant", "Echo: r2"),
    ]
    assert await stored(stack, branch) == [
        ("user", "r1"),
        ("assistant", "Echo: r1"),
        ("user", "r2 #fake tokens=2"),
        ("assistant", "tok0 tok1 "),
    ]
    [sent] = [r["body"]["messages"] for r in await stack.upstream_requests()]
    assert [(m["role"], m["content"]) for m in sent if m["role"] != "system"] == [
        ("user", "r1"),
        ("assistant", "Echo: r1"),
        ("user", "r2 #fake tokens=2"),
    ]
    detail = (await http.get(f"{stack.base_url}/v1/conversations/{branch}")).json()
    assert detail["parent_id"] == first
    # The chat goes on in the branch.
    later, _ = await chat(
        http,
        stack,
        [user("r1"), assistant(a1), user("r2 #fake tokens=2"), assistant(a2_again), user("r3")],
        headers=headers,
    )
    assert later == branch
    assert len(await stored(stack, branch)) == 6


async def test_edited_message_starts_a_branch_without_a_chat_id(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    first, a1 = await chat(http, stack, [user("e1 unique-edit-test")])
    same, _a2 = await chat(http, stack, [user("e1 unique-edit-test"), assistant(a1), user("e2")])
    assert same == first
    edited, _ = await chat(
        http, stack, [user("e1 unique-edit-test"), assistant(a1), user("e2 edited")]
    )
    assert edited != first
    assert (await stored(stack, first))[-2:] == [("user", "e2"), ("assistant", "Echo: e2")]


async def test_api_style_thirty_turns_send_twenty_history_messages(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    conversation_id, _ = await chat(http, stack, [user("turn 0")], stream=False)
    headers = {"X-Conversation-ID": conversation_id}
    for turn in range(1, 30):
        same, _ = await chat(http, stack, [user(f"turn {turn}")], headers=headers, stream=False)
        assert same == conversation_id
    await stack.forget_upstream_requests()
    await chat(http, stack, [user("turn 30")], headers=headers, stream=False)
    [sent] = [r["body"]["messages"] for r in await stack.upstream_requests()]
    history = [m for m in sent if m["role"] != "system"]
    assert len(history) == 20 + 1
    assert history[0] == {"role": "user", "content": "turn 20"}
    assert history[-1] == {"role": "user", "content": "turn 30"}
    assert len(await stored(stack, conversation_id)) == 62


async def test_title_task_racing_the_first_turn_lands_in_one_conversation(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    headers = {"X-OpenWebUI-Chat-Id": "owui-title-race"}
    task = asyncio.create_task(
        chat(http, stack, [user(TITLE_TASK + "USER: hello")], stream=False, headers=headers)
    )
    await asyncio.sleep(0.1)  # OpenWebUI 0.12 sends the title task just before the turn
    conversation_id, answer = await chat(http, stack, [user("hello")], headers=headers)
    task_conversation, task_answer = await task
    assert task_conversation == conversation_id
    assert task_answer == '{"title": "Homelab Chat"}'
    assert await stored(stack, conversation_id) == [("user", "hello"), ("assistant", answer)]
    detail = (await http.get(f"{stack.base_url}/v1/conversations/{conversation_id}")).json()
    assert detail["title"] == "Homelab Chat"


async def test_title_task_over_responses_names_the_chats_conversation(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """OpenWebUI's Responses connection: the same title task as `input`, then the turn."""
    headers = {"X-OpenWebUI-Chat-Id": "owui-responses-title"}
    url = f"{stack.base_url}/v1/responses"

    def item(text: str) -> Msg:
        return {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        }

    task = await http.post(
        url,
        json={
            "model": "ollama:fake-model",
            "input": [item(TITLE_TASK + "USER: hello")],
            "max_output_tokens": 1000,
            "stream": False,
        },
        headers=headers,
    )
    assert task.status_code == 200, task.text
    assert task.json()["output"][0]["content"][0]["text"] == '{"title": "Homelab Chat"}'
    conversation_id = task.headers["x-conversation-id"]
    turn = await http.post(
        url, json={"model": "ollama:fake-model", "input": [item("hello")]}, headers=headers
    )
    assert turn.status_code == 200, turn.text
    assert turn.headers["x-conversation-id"] == conversation_id
    assert await stored(stack, conversation_id) == [("user", "hello"), ("assistant", "Echo: hello")]
    detail = (await http.get(f"{stack.base_url}/v1/conversations/{conversation_id}")).json()
    assert detail["title"] == "Homelab Chat"


async def test_task_model_routes_tasks(
    make_stack: Callable[..., Stack], http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_TASK_MODEL="openai-chat:cheap-task-model")
    stack.start_web()
    stack.start_worker()
    await stack.forget_upstream_requests()
    _, _answer = await chat(
        http, stack, [user("### Task:\nSuggest 3 follow-up questions.")], stream=False
    )
    [sent] = [r["body"] for r in await stack.upstream_requests()]
    assert sent["model"] == "cheap-task-model"
    assert not any("You are HAIA" in str(m["content"]) for m in sent["messages"])
    count = await dbcheck.query(
        stack.database_url,
        "SELECT COUNT(*) AS n FROM haia_message WHERE content LIKE $1",
        "%Suggest 3 follow-up%",
    )
    assert count[0]["n"] == 0


async def test_conversations_api(stack: Stack, http: httpx.AsyncClient) -> None:
    owner = {"X-OpenWebUI-User-Id": "lister"}
    created = []
    for i in range(5):
        conversation_id, _ = await chat(http, stack, [user(f"list me {i}")], headers=owner)
        created.append(conversation_id)
    pages, after = [], None
    while True:
        params = {"limit": "2", **({"after": after} if after else {})}
        page = (
            await http.get(f"{stack.base_url}/v1/conversations", params=params, headers=owner)
        ).json()
        pages.append([c["id"] for c in page["data"]])
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [cid for page in pages for cid in page] == list(reversed(created))
    first = (await http.get(f"{stack.base_url}/v1/conversations", headers=owner)).json()
    assert first["data"][0]["title"] == "list me 4"
    assert first["data"][0]["message_count"] == 2

    before = first["data"][-1]["updated_at"]
    await chat(http, stack, [user("again")], headers={**owner, "X-Conversation-ID": created[0]})
    newest = (await http.get(f"{stack.base_url}/v1/conversations", headers=owner)).json()
    assert newest["data"][0]["id"] == created[0]
    assert newest["data"][0]["updated_at"] > before

    detail = (
        await http.get(f"{stack.base_url}/v1/conversations/{created[0]}", headers=owner)
    ).json()
    roles = [(m["role"], m["status"]) for m in detail["messages"]]
    assert roles == [("user", "completed"), ("assistant", "completed")] * 2
    assert detail["messages"][1]["model"] == "ollama:fake-model"
    assert detail["messages"][1]["usage"]["completion_tokens"] > 0
    completion_id = detail["messages"][1]["completion_id"]

    client = aioredis.Redis.from_url(stack.env["HAIA_REDIS_URL"])
    try:
        assert await client.exists(f"haia:gen:{completion_id}:log")
        deleted = await http.delete(
            f"{stack.base_url}/v1/conversations/{created[0]}", headers=owner
        )
        assert deleted.json() == {
            "id": created[0],
            "object": "conversation.deleted",
            "deleted": True,
        }
        assert not await client.exists(f"haia:gen:{completion_id}:log")
    finally:
        await client.aclose()
    gone = await http.get(f"{stack.base_url}/v1/conversations/{created[0]}", headers=owner)
    assert gone.status_code == 404
    assert await dbcheck.messages(stack.database_url, created[0]) == []
    again = await http.delete(f"{stack.base_url}/v1/conversations/{created[0]}", headers=owner)
    assert again.status_code == 404


async def test_owners_cannot_see_each_other(
    make_stack: Callable[..., Stack], http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_API_KEYS="key-one-secret,key-two-secret")
    stack.start_web()
    stack.start_worker()
    one = {"Authorization": "Bearer key-one-secret"}
    two = {"Authorization": "Bearer key-two-secret"}
    base = stack.base_url

    anonymous = await http.post(f"{base}/v1/chat/completions", json={"messages": [user("x")]})
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "authentication_error"
    wrong = await http.get(f"{base}/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401

    conversation_id, _ = await chat(http, stack, [user("mine")], headers=one, stream=False)
    detail = (await http.get(f"{base}/v1/conversations/{conversation_id}", headers=one)).json()
    completion_id = detail["messages"][1]["completion_id"]

    for method, path in [
        ("GET", f"/v1/conversations/{conversation_id}"),
        ("DELETE", f"/v1/conversations/{conversation_id}"),
        ("GET", f"/v1/chat/completions/{completion_id}"),
        ("GET", f"/v1/chat/completions/{completion_id}/stream"),
        ("POST", f"/v1/chat/completions/{completion_id}/cancel"),
    ]:
        response = await http.request(method, f"{base}{path}", headers=two)
        assert response.status_code == 404, (method, path)
    listed = (await http.get(f"{base}/v1/conversations", headers=two)).json()
    assert listed["data"] == []
    await chat(
        http,
        stack,
        [user("theirs")],
        stream=False,
        status=404,
        headers={**two, "X-Conversation-ID": conversation_id},
    )
    # Under one key, OpenWebUI's users are owners of their own.
    as_user = {**one, "X-OpenWebUI-User-Id": "alice"}
    assert (await http.get(f"{base}/v1/conversations", headers=as_user)).json()["data"] == []
    assert (
        await http.get(f"{base}/v1/conversations/{conversation_id}", headers=one)
    ).status_code == 200
    assert (await http.get(f"{base}/health")).status_code == 200  # probes need no key

    logs = stack.logs()
    assert "key-one-secret" not in logs and "key-two-secret" not in logs
    rows = await dbcheck.query(stack.database_url, "SELECT owner FROM haia_conversation")
    assert all("secret" not in row["owner"] for row in rows)


TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_timestamp",
        "parameters": {"type": "object", "properties": {}},
    },
}


async def test_a_tool_round_trip_resent_re_serialized_stays_one_conversation(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """OpenWebUI resends a tool call's arguments re-serialized (`{"query":"tok 0","n":0}` for
    the model's `{"query": "tok 0", "n": 0}`): the same call, not an edited history."""
    headers = {"X-OpenWebUI-Chat-Id": "owui-tool-chat", "X-OpenWebUI-User-Id": "u-tools"}
    question = user("What time is it? #fake call=1")
    body = {"model": "ollama:fake-model", "messages": [question], "tools": [TOOL]}
    url = f"{stack.base_url}/v1/chat/completions"
    first = await http.post(url, json=body, headers=headers)
    assert first.status_code == 200, first.text
    conversation_id = first.headers["x-conversation-id"]
    call = first.json()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["arguments"] == '{"query": "tok 0", "n": 0}'
    resent = {**call, "function": {**call["function"], "arguments": '{"query":"tok 0","n":0}'}}
    messages = [
        question,
        {"role": "assistant", "content": "", "tool_calls": [resent]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"now": 1}'},
    ]
    second = await http.post(url, json={**body, "messages": messages}, headers=headers)
    assert second.status_code == 200, second.text
    assert second.headers["x-conversation-id"] == conversation_id
    assert second.json()["choices"][0]["message"]["content"] == (
        "Echo: What time is it? [tool results: 1]"
    )
    rows = await dbcheck.messages(stack.database_url, conversation_id)
    assert [r["role"] for r in rows] == ["user", "assistant", "tool", "assistant"]


async def test_a_stateful_tool_follow_up_repeating_the_call_stores_it_once(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """OpenWebUI's Responses connection with ENABLE_RESPONSES_API_STATEFUL: the tool follow-up
    carries `previous_response_id` AND the call it answers again, then the next turn resends
    the whole chat. The call is stored and shown to the model once; the chat stays one
    conversation."""
    headers = {"X-OpenWebUI-Chat-Id": "owui-stateful-tools"}
    url = f"{stack.base_url}/v1/responses"
    tool = {"type": "function", "name": "get_current_timestamp", "parameters": {}}
    question = {"type": "message", "role": "user", "content": "Time? #fake call=1"}
    base = {"model": "ollama:fake-model", "tools": [tool]}
    first = await http.post(url, json={**base, "input": [question]}, headers=headers)
    assert first.status_code == 200, first.text
    conversation_id = first.headers["x-conversation-id"]
    call = first.json()["output"][0]
    assert call["type"] == "function_call"
    repeated = {
        "type": "function_call",
        "call_id": call["call_id"],
        "name": call["name"],
        "arguments": '{"query":"tok 0","n":0}',
    }
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "{}"}
    await stack.forget_upstream_requests()
    follow_up = await http.post(
        url,
        json={**base, "input": [repeated, result], "previous_response_id": first.json()["id"]},
        headers=headers,
    )
    assert follow_up.status_code == 200, follow_up.text
    assert follow_up.headers["x-conversation-id"] == conversation_id
    answer = follow_up.json()["output"][0]["content"][0]["text"]
    asked = (await stack.upstream_requests())[-1]["body"]["messages"]
    assert [m["role"] for m in asked] == ["user", "assistant", "tool"]
    reply = {"type": "message", "role": "assistant", "content": answer}
    again = {"type": "message", "role": "user", "content": "Thanks."}
    last = await http.post(
        url, json={**base, "input": [question, repeated, result, reply, again]}, headers=headers
    )
    assert last.status_code == 200, last.text
    assert last.headers["x-conversation-id"] == conversation_id
    rows = await dbcheck.messages(stack.database_url, conversation_id)
    assert [r["role"] for r in rows] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
