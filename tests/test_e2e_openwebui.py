"""The real OpenWebUI (pip `open-webui` 0.12.4) chatting through HAIA, over its Responses
connection and over Chat Completions: opt-in, `pytest -m openwebui` (or HAIA_TEST_OPENWEBUI=1).

OpenWebUI runs offline as a real process (one per module and database: it takes ~1.3 GB and
20+ s to start) with HAIA as its one OpenAI connection, forwarding its user info headers
(`X-OpenWebUI-Chat-Id` among them). The test signs in as its admin and drives it through its
own HTTP API exactly as its web UI does: `POST /api/chat/completions` with a `session_id`, the
new `user_message`, the assistant message `id` and `parent_id` (no `messages`: OpenWebUI
rebuilds the history from its own database, turns its stored output items into Responses input
items, runs the built-in tools the model calls, and runs its title/tags/follow-up tasks), then
reads the chat back from `GET /api/v1/chats/{id}` once the answer is `done`. The connection's
API type is switched between `responses` and chat completions (`""`) with
`POST /openai/config/update`, as the admin's connection dialog does.

What must hold on both API types: a chat is ONE HAIA conversation with every turn once (tool
calls and their results included) and named by the title task; what OpenWebUI stores is what
HAIA streamed; images reach the model; reasoning is shown; a built-in tool runs and the answer
after it completes; an upstream failure is shown as an error, never as a silently empty answer.

Where OpenWebUI lives: HAIA_OPENWEBUI_BIN, else /work/owui-venv/bin/open-webui, else
`open-webui` on PATH (install it in a venv of its own: `pip install open-webui==0.12.4`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import REDIS_BASE, stack_env
from tests.procs import Proc, Stack, free_port, spawn, wait_until
from tests.sse import frames

pytestmark = [pytest.mark.e2e, pytest.mark.openwebui]

API_KEY = "sk-haia-openwebui-test"
MODEL = "ollama:fake-model"
API_TYPES = ["responses", "chat"]
TASK_TITLE = "Homelab Chat"  # what the fake upstream answers OpenWebUI's title task
IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8Dw"
    "HwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)
START_TIMEOUT = 300  # seconds for OpenWebUI's first start (migrations) on a busy machine
ANSWER_TIMEOUT = 60


def openwebui_bin() -> str | None:
    given = os.environ.get("HAIA_OPENWEBUI_BIN")
    if given:
        return given
    default = Path("/work/owui-venv/bin/open-webui")
    if default.exists():
        return str(default)
    return shutil.which("open-webui")


def offline_env(*, data_dir: Path, haia: str, port: int) -> dict[str, str]:
    """OpenWebUI offline with a ready admin and HAIA as its only connection (CLIENTS.md)."""
    return {
        "DATA_DIR": str(data_dir),
        "WEBUI_SECRET_KEY": "haia-test-openwebui-secret",
        "WEBUI_ADMIN_EMAIL": "admin@example.com",
        "WEBUI_ADMIN_PASSWORD": "admin-password-1",
        "WEBUI_ADMIN_NAME": "Admin",
        "PORT": str(port),
        "OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "ENABLE_VERSION_UPDATE_CHECK": "false",
        "RAG_EMBEDDING_ENGINE": "openai",
        "BYPASS_EMBEDDING_AND_RETRIEVAL": "true",
        "ANONYMIZED_TELEMETRY": "false",
        "DO_NOT_TRACK": "true",
        "SCARF_NO_ANALYTICS": "true",
        "ENABLE_OLLAMA_API": "false",
        "OPENAI_API_BASE_URL": f"{haia}/v1",
        "OPENAI_API_KEY": API_KEY,
        "ENABLE_FORWARD_USER_INFO_HEADERS": "true",
    }


@dataclass
class Answer:
    """An assistant message as OpenWebUI stored it in its chat."""

    chat_id: str
    message_id: str
    message: dict[str, Any]

    @property
    def content(self) -> str:
        return str(self.message.get("content") or "")

    @property
    def output(self) -> list[dict[str, Any]]:
        return list(self.message.get("output") or [])

    @property
    def error(self) -> Any:
        return (self.message.get("error") or {}).get("content")

    def items(self, kind: str) -> list[dict[str, Any]]:
        return [item for item in self.output if item.get("type") == kind]

    def shown_reasoning(self) -> list[str]:
        """The reasoning OpenWebUI's UI shows, per reasoning item: its summary when it has
        one, else its content."""
        texts = []
        for item in self.items("reasoning"):
            parts = item.get("summary") or item.get("content") or []
            texts.append("".join(str(part.get("text") or "") for part in parts))
        return texts


class OpenWebUI:
    """OpenWebUI's HTTP API, driven as its web UI drives it, signed in as the admin."""

    def __init__(self, base_url: str, http: httpx.AsyncClient) -> None:
        self.base_url = base_url
        self.http = http
        self.user_id = ""
        self.models: dict[str, dict[str, Any]] = {}

    async def set_api_type(self, api_type: str) -> None:
        """The admin's connection setting: `responses`, or chat completions (`chat`)."""
        config = (await self.http.get("/openai/config")).json()
        configs = config.setdefault("OPENAI_API_CONFIGS", {})
        configs.setdefault("0", {})["api_type"] = "responses" if api_type == "responses" else ""
        response = await self.http.post("/openai/config/update", json=config)
        response.raise_for_status()
        models = (await self.http.get("/api/models")).json()["data"]
        self.models = {model["id"]: model for model in models}

    async def send(
        self,
        text: str,
        *,
        chat_id: str | None = None,
        parent_id: str | None = None,
        images: Sequence[str] = (),
        model: str = MODEL,
        params: dict[str, Any] | None = None,
    ) -> Answer:
        """One turn as the UI sends it; waits until OpenWebUI has stored the whole answer."""
        user_id, assistant_id = str(uuid.uuid4()), str(uuid.uuid4())
        user_message: dict[str, Any] = {
            "id": user_id,
            "parentId": parent_id,
            "childrenIds": [assistant_id],
            "role": "user",
            "content": text,
            "timestamp": int(time.time()),
            "models": [model],
        }
        if images:
            user_message["files"] = [{"type": "image", "url": url} for url in images]
        tasks: dict[str, bool] = {"follow_up_generation": True}
        if chat_id is None:  # the UI asks for a title and tags on a new chat's first turn
            tasks |= {"title_generation": True, "tags_generation": True}
        body: dict[str, Any] = {
            "stream": True,
            "model": model,
            "params": params or {},
            "tool_servers": [],
            "features": {
                "voice": False,
                "image_generation": False,
                "code_interpreter": False,
                "web_search": False,
            },
            "variables": {},
            "model_item": self.models[model],
            "session_id": f"haia-test-{uuid.uuid4().hex[:12]}",
            "id": assistant_id,
            "parent_id": parent_id,
            "user_message": user_message,
            "background_tasks": tasks,
        }
        if chat_id is not None:
            body["chat_id"] = chat_id
        response = await self.http.post("/api/chat/completions", json=body)
        assert response.status_code == 200, response.text
        chat_id = str(response.json()["chat_id"])
        return Answer(chat_id, assistant_id, await self._done(chat_id, assistant_id))

    async def _done(self, chat_id: str, message_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + ANSWER_TIMEOUT
        message: dict[str, Any] = {}
        while time.monotonic() < deadline:
            chat = (await self.http.get(f"/api/v1/chats/{chat_id}")).json()
            message = chat["chat"]["history"]["messages"].get(message_id) or {}
            if message.get("done"):
                return message
            await asyncio.sleep(0.2)
        raise AssertionError(f"OpenWebUI never finished answer {message_id}: {message}")

    async def title(self, chat_id: str) -> str:
        chat = (await self.http.get(f"/api/v1/chats/{chat_id}")).json()
        return str(chat.get("title") or "")


@pytest.fixture(scope="module")
def owui_bin() -> str:
    found = openwebui_bin()
    if found is None or not Path(found).exists():
        pytest.skip(
            "OpenWebUI is not installed: set HAIA_OPENWEBUI_BIN, or "
            "`python3 -m venv /work/owui-venv && /work/owui-venv/bin/pip install "
            "open-webui==0.12.4`"
        )
    return found


@pytest.fixture(scope="module")
def haia(owui_bin: str, database_url: str, fake_upstream: str, log_dir: Path) -> Iterator[Stack]:
    """web + worker with an API key, as a homelab runs HAIA behind OpenWebUI."""
    port = free_port()
    redis_url = f"{REDIS_BASE}/7"
    redis.Redis.from_url(redis_url).flushdb()
    running = Stack(
        base_url=f"http://127.0.0.1:{port}",
        env=stack_env(
            port=port,
            database_url=database_url,
            upstream=fake_upstream,
            redis_url=redis_url,
            HAIA_API_KEYS=API_KEY,
        ),
        log_dir=log_dir,
        database_url=database_url,
        upstream_url=fake_upstream,
    )
    running.start_web()
    running.start_worker()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def owui_proc(
    owui_bin: str, haia: Stack, tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> Iterator[tuple[str, Proc]]:
    port = free_port()
    data_dir = tmp_path_factory.mktemp("openwebui")
    env = offline_env(data_dir=data_dir, haia=haia.base_url, port=port)
    proc = spawn(
        "openwebui",
        [owui_bin, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env,
        log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200,
            START_TIMEOUT,
            "OpenWebUI",
            [proc],
        )
        yield url, proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def owui_token(owui_proc: tuple[str, Proc]) -> dict[str, str]:
    """The admin's session, signed in once (OpenWebUI rate-limits sign-ins)."""
    response = httpx.post(
        f"{owui_proc[0]}/api/v1/auths/signin",
        json={"email": "admin@example.com", "password": "admin-password-1"},
        timeout=30,
    )
    response.raise_for_status()
    return {"id": response.json()["id"], "token": response.json()["token"]}


@pytest.fixture
async def owui(owui_proc: tuple[str, Proc], owui_token: dict[str, str]) -> AsyncIterator[OpenWebUI]:
    async with httpx.AsyncClient(base_url=owui_proc[0], timeout=30) as http:
        client = OpenWebUI(owui_proc[0], http)
        client.user_id = owui_token["id"]
        http.headers["Authorization"] = f"Bearer {owui_token['token']}"
        yield client


@pytest.fixture
async def api(request: pytest.FixtureRequest, owui: OpenWebUI) -> str:
    """The connection's API type for this test (`responses` or `chat`)."""
    api_type = str(request.param)
    await owui.set_api_type(api_type)
    return api_type


# -- HAIA's side ----------------------------------------------------------------------------


class Haia:
    def __init__(self, stack: Stack, user_id: str) -> None:
        self.stack = stack
        self.headers = {
            "Authorization": f"Bearer {API_KEY}",
            "X-OpenWebUI-User-Id": user_id,
        }

    async def get(self, path: str) -> Any:
        async with httpx.AsyncClient(base_url=self.stack.base_url, timeout=10) as http:
            response = await http.get(path, headers=self.headers)
            response.raise_for_status()
            return response.json()

    async def conversation_ids(self) -> set[str]:
        found: set[str] = set()
        after = None
        while True:
            page = await self.get(
                "/v1/conversations?limit=100" + (f"&after={after}" if after else "")
            )
            found.update(str(c["id"]) for c in page["data"])
            if not page.get("has_more"):
                return found
            after = page["last_id"]

    async def conversation(self, conversation_id: str) -> dict[str, Any]:
        return dict(await self.get(f"/v1/conversations/{conversation_id}"))

    async def streamed_text(self, completion_id: str) -> str:
        """The answer's text as HAIA streamed it: its events replayed from the start."""
        if completion_id.startswith("resp_"):
            path = f"/v1/responses/{completion_id}?stream=true"
            kind, field = "response.output_text.delta", "delta"
        else:
            path = f"/v1/chat/completions/{completion_id}/stream"
            kind, field = "", ""
        texts = []
        async with (
            httpx.AsyncClient(base_url=self.stack.base_url, timeout=10) as http,
            http.stream("GET", path, headers=self.headers) as response,
        ):
            assert response.status_code == 200
            async for frame in frames(response):
                if frame.data is None:
                    continue
                if frame.data == "[DONE]":
                    break
                data = json.loads(frame.data)
                if kind:
                    if data.get("type") == kind:
                        texts.append(data[field])
                    continue
                for choice in data.get("choices") or ():
                    texts.append((choice.get("delta") or {}).get("content") or "")
        return "".join(texts)


@pytest.fixture
async def haia_side(haia: Stack, owui: OpenWebUI) -> Haia:
    await haia.forget_upstream_requests()
    return Haia(haia, owui.user_id)


async def settled(haia: Haia, before: set[str]) -> list[dict[str, Any]]:
    """The conversations made since `before`, once no turn of theirs is still running
    (OpenWebUI's follow-up task may still be in flight: it is not stored)."""
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while True:
        made = [await haia.conversation(i) for i in (await haia.conversation_ids()) - before]
        running = [
            m for c in made for m in c["messages"] if m["status"] in ("queued", "in_progress")
        ]
        if not running or time.monotonic() > deadline:
            return made
        await asyncio.sleep(0.2)


def turns(conversation: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"] or "") for m in conversation["messages"]]


async def chat_requests(haia: Haia) -> list[dict[str, Any]]:
    """What the model was asked for the chat turns (OpenWebUI's `### Task:` requests left
    out), without HAIA's own instructions (added on chat completions only)."""
    asked = []
    for request in await haia.stack.upstream_requests():
        body = request["body"]
        messages = body.get("messages") or []
        content = messages[-1].get("content") if messages else ""
        if isinstance(content, list):  # parts, or Anthropic's blocks
            content = " ".join(str(part.get("text") or "") for part in content)
        if str(content).lstrip().startswith("### Task:"):
            continue
        dialogue = [m for m in messages if m.get("role") != "system"]
        asked.append({**body, "messages": dialogue})
    return asked


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("api", API_TYPES, indirect=True)
async def test_two_turns_are_one_conversation_named_by_the_title_task(
    api: str, owui: OpenWebUI, haia_side: Haia
) -> None:
    before = await haia_side.conversation_ids()
    first = await owui.send(f"Hello over {api}, how are you?")
    assert first.error is None
    assert first.content == f"Echo: Hello over {api}, how are you?"
    second = await owui.send(
        "And a second question.", chat_id=first.chat_id, parent_id=first.message_id
    )
    assert second.error is None
    assert second.content == "Echo: And a second question."

    made = await settled(haia_side, before)
    assert len(made) == 1, [turns(c) for c in made]  # one conversation, no branch
    conversation = made[0]
    assert turns(conversation) == [
        ("user", f"Hello over {api}, how are you?"),
        ("assistant", first.content),
        ("user", "And a second question."),
        ("assistant", second.content),
    ]
    assert conversation["title"] == TASK_TITLE
    # The second turn's model saw the first: the whole history, once.
    asked = await chat_requests(haia_side)
    assert [(m["role"], m["content"]) for m in asked[-1]["messages"]] == [
        ("user", f"Hello over {api}, how are you?"),
        ("assistant", first.content),
        ("user", "And a second question."),
    ]
    # What OpenWebUI stored is what HAIA streamed.
    for answer, stored in zip((first, second), conversation["messages"][1::2], strict=True):
        assert stored["completion_id"].startswith("resp_" if api == "responses" else "chatcmpl-")
        assert await haia_side.streamed_text(stored["completion_id"]) == answer.content
    assert await owui.title(first.chat_id) == TASK_TITLE


@pytest.mark.parametrize("api", API_TYPES, indirect=True)
async def test_an_image_reaches_the_model(api: str, owui: OpenWebUI, haia_side: Haia) -> None:
    answer = await owui.send(f"What is in this picture ({api})?", images=[IMAGE])
    assert answer.error is None
    assert answer.content == f"Echo: What is in this picture ({api})? [images: 1]"
    last = (await chat_requests(haia_side))[-1]["messages"][-1]
    assert last["role"] == "user"
    images = [p["image_url"]["url"] for p in last["content"] if p["type"] == "image_url"]
    assert images == [IMAGE]


@pytest.mark.parametrize("api", API_TYPES, indirect=True)
async def test_reasoning_is_shown_and_the_chat_goes_on(
    api: str, owui: OpenWebUI, haia_side: Haia
) -> None:
    before = await haia_side.conversation_ids()
    question = f"Think about it over {api}. #fake think=3"
    first = await owui.send(question)
    assert first.error is None
    assert first.content == f"Echo: Think about it over {api}."
    assert first.shown_reasoning() == ["think0 think1 think2 "]
    second = await owui.send("Thanks.", chat_id=first.chat_id, parent_id=first.message_id)
    assert second.content == "Echo: Thanks."

    made = await settled(haia_side, before)
    assert len(made) == 1, [turns(c) for c in made]
    messages = made[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["reasoning_content"] == "think0 think1 think2 "
    # Reasoning is never sent back to the model as content.
    asked = (await chat_requests(haia_side))[-1]["messages"]
    assert [m["content"] for m in asked] == [question, first.content, "Thanks."]


@pytest.mark.parametrize("api", API_TYPES, indirect=True)
async def test_a_builtin_tool_runs_and_the_answer_follows(
    api: str, owui: OpenWebUI, haia_side: Haia
) -> None:
    before = await haia_side.conversation_ids()
    question = f"What time is it ({api})? #fake call=1"
    first = await owui.send(question)
    assert first.error is None
    calls = first.items("function_call")
    results = first.items("function_call_output")
    assert [c["name"] for c in calls] == ["get_current_timestamp"]  # OpenWebUI's first tool
    assert [r["call_id"] for r in results] == [calls[0]["call_id"]]
    result = "".join(part.get("text", "") for part in results[0]["output"])
    assert "current_timestamp" in result  # OpenWebUI ran its tool
    assert first.content == f"Echo: What time is it ({api})? [tool results: 1]"
    second = await owui.send("And tomorrow?", chat_id=first.chat_id, parent_id=first.message_id)
    assert second.error is None
    assert second.content == "Echo: And tomorrow?"

    made = await settled(haia_side, before)
    assert len(made) == 1, [turns(c) for c in made]  # the tool round trip did not branch it
    messages = made[0]["messages"]
    assert [m["role"] for m in messages] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    assert messages[1]["tool_calls"][0]["function"]["name"] == "get_current_timestamp"
    assert messages[2]["tool_call_id"] == calls[0]["call_id"]
    assert messages[2]["content"] == result
    assert messages[3]["content"] == first.content


@pytest.mark.parametrize("api", API_TYPES, indirect=True)
async def test_an_upstream_failure_is_shown(api: str, owui: OpenWebUI, haia_side: Haia) -> None:
    refused = await owui.send(f"Refuse this ({api}). #fake status=400")
    assert refused.content == ""
    assert "rejected the request (status 400)" in json.dumps(refused.error)

    cut = await owui.send(f"Fail midway ({api}). #fake tokens=5 midfail=2")
    assert cut.content.strip() == "tok0 tok1"  # the partial answer is kept
    assert "fake mid-stream failure" in json.dumps(cut.error)


@pytest.mark.parametrize("api", API_TYPES, indirect=True)
async def test_anthropic_thinking_goes_back_signed_in_a_tool_round_trip(
    api: str, owui: OpenWebUI, haia_side: Haia
) -> None:
    """OpenWebUI sends no reasoning back (over Responses it drops reasoning items), yet
    Anthropic requires the signed thinking block before its tool_use in the follow-up: HAIA
    sends the one it stored, which it finds only if the round trip stays in its conversation."""
    question = f"Think, then check the time ({api}). #fake think=2 call=1"
    answer = await owui.send(question, model="anthropic:claude-fake")
    assert answer.error is None
    assert answer.shown_reasoning() == ["think0 think1 "] * 2  # before the call, after it
    assert [c["name"] for c in answer.items("function_call")] == ["get_current_timestamp"]
    assert answer.content == f"Echo: Think, then check the time ({api}). [tool results: 1]"
    follow_up = (await chat_requests(haia_side))[-1]["messages"]
    assert [m["role"] for m in follow_up] == ["user", "assistant", "user"]
    blocks = follow_up[1]["content"]
    assert [b["type"] for b in blocks] == ["thinking", "tool_use"]
    assert blocks[0]["thinking"] == "think0 think1 "
    assert blocks[0]["signature"] == "sig-fake-2"


@pytest.mark.parametrize("api", API_TYPES, indirect=True)
async def test_the_chats_model_parameters_reach_the_model(
    api: str, owui: OpenWebUI, haia_side: Haia
) -> None:
    """OpenWebUI's chat controls (advanced params). Over Responses it renames only
    max_tokens; reasoning_effort and seed arrive under their chat completions names."""
    params = {"reasoning_effort": "high", "temperature": 0.3, "top_p": 0.9, "seed": 7}
    answer = await owui.send(f"Careful now ({api}).", params={**params, "max_tokens": 50})
    assert answer.error is None
    asked = (await chat_requests(haia_side))[-1]
    assert {name: asked.get(name) for name in params} == params
    assert asked["max_tokens"] == 50


@pytest.mark.parametrize("api", API_TYPES, indirect=True)
async def test_parallel_tool_calls_run_and_stay_one_conversation(
    api: str, owui: OpenWebUI, haia_side: Haia
) -> None:
    before = await haia_side.conversation_ids()
    first = await owui.send(f"Two tools at once ({api}). #fake call=2")
    assert first.error is None
    calls = first.items("function_call")
    assert [c["name"] for c in calls] == ["get_current_timestamp", "calculate_timestamp"]
    results = first.items("function_call_output")
    assert sorted(r["call_id"] for r in results) == sorted(c["call_id"] for c in calls)
    assert first.content == f"Echo: Two tools at once ({api}). [tool results: 2]"
    second = await owui.send("Thanks.", chat_id=first.chat_id, parent_id=first.message_id)
    assert second.content == "Echo: Thanks."

    made = await settled(haia_side, before)
    assert len(made) == 1, [turns(c) for c in made]
    roles = [m["role"] for m in made[0]["messages"]]
    assert roles == ["user", "assistant", "tool", "tool", "assistant", "user", "assistant"]
