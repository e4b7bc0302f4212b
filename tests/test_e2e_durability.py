"""Disconnects, resumes, cancels and process deaths: nothing is lost, every outcome explicit."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from tests import dbcheck
from tests.procs import Stack
from tests.sse import Frame, frames, read_all

pytestmark = pytest.mark.e2e

StackFactory = Callable[..., Stack]


def expected(tokens: int) -> str:
    return "".join(f"tok{i} " for i in range(tokens))


def text_of(received: list[Frame]) -> str:
    text = ""
    for frame in received:
        if frame.data and frame.data.startswith("{") and "choices" in frame.data:
            for choice in frame.json()["choices"]:
                text += choice["delta"].get("content") or ""
    return text


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=30)) as client:
        yield client


async def start_stream(
    http: httpx.AsyncClient, stack: Stack, content: str, *, read: int
) -> tuple[str, list[Frame]]:
    """POST a streaming chat, read `read` content frames, then leave. Returns (id, frames)."""
    body = {
        "model": "ollama:fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": content}],
    }
    got: list[Frame] = []
    async with http.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for frame in frames(r):
            got.append(frame)
            if frame.id is not None and len([f for f in got if f.id]) >= read:
                break
    completion_id = json.loads(str(got[0].data))["id"]
    return completion_id, got


async def attach(
    http: httpx.AsyncClient,
    stack: Stack,
    completion_id: str,
    *,
    after: int | None = None,
    header: bool = True,
    limit: int | None = None,
) -> list[Frame]:
    url = f"{stack.base_url}/v1/chat/completions/{completion_id}/stream"
    headers, params = {}, {}
    if after is not None:
        if header:
            headers["Last-Event-ID"] = str(after)
        else:
            params["starting_after"] = str(after)
    got: list[Frame] = []
    async with http.stream("GET", url, headers=headers, params=params) as r:
        assert r.status_code == 200, await r.aread()
        async for frame in frames(r):
            got.append(frame)
            if limit is not None and len([f for f in got if f.id]) >= limit:
                break
    return got


def last_id(received: list[Frame]) -> int:
    ids = [int(f.id) for f in received if f.id is not None]
    return ids[-1] if ids else 0


@pytest.fixture
def running(make_stack: StackFactory) -> Stack:
    stack = make_stack(HAIA_KEEPALIVE_INTERVAL="0.3", HAIA_WORKER_DEAD_AFTER="3")
    stack.start_web()
    stack.start_worker()
    return stack


async def test_resume_at_random_points_is_byte_exact(
    running: Stack, http: httpx.AsyncClient
) -> None:
    rng = random.Random(20261124)
    completion_id, first = await start_stream(http, running, "#fake tokens=80 delay=0.02", read=5)
    by_id = {f.id: f for f in first if f.id}
    received = list(first)
    while received[-1].data != "[DONE]":
        use_header = rng.random() < 0.5
        part = await attach(
            http,
            running,
            completion_id,
            after=last_id(received),
            header=use_header,
            limit=rng.randint(1, 15),
        )
        # No role chunk when resuming; resumed just after the last event, only [DONE] is left.
        assert part[0].id is not None or part[0].comment or part[0].data == "[DONE]"
        assert "assistant" not in str(part[0].data) or part[0].id != "1"
        for frame in part:
            if frame.id:
                assert frame.id not in by_id, "duplicate event"
                by_id[frame.id] = frame
        received += part
    assert text_of(received) == expected(80)
    ids = sorted(int(i) for i in by_id)
    assert ids == list(range(ids[0], ids[-1] + 1)), "gap in event ids"

    full = await attach(http, running, completion_id)
    assert [(f.id, f.data) for f in full if f.id] == [
        (f.id, f.data) for f in sorted(by_id.values(), key=lambda f: int(str(f.id)))
    ]
    row = await dbcheck.message_by_completion(running.database_url, completion_id)
    assert (row["status"], row["content"]) == ("completed", expected(80))


async def test_two_clients_attached_at_once_see_the_same_stream(
    running: Stack, http: httpx.AsyncClient
) -> None:
    completion_id, _ = await start_stream(http, running, "#fake tokens=40 delay=0.02", read=1)
    one, two = await asyncio.gather(
        attach(http, running, completion_id), attach(http, running, completion_id, after=0)
    )
    data_one = [(f.id, f.data) for f in one if not f.comment]
    assert data_one == [(f.id, f.data) for f in two if not f.comment]
    assert data_one[-1][1] == "[DONE]"
    assert text_of(one) == expected(40)


async def test_status_while_running_and_after(running: Stack, http: httpx.AsyncClient) -> None:
    completion_id, got = await start_stream(http, running, "#fake tokens=60 delay=0.05", read=10)
    url = f"{running.base_url}/v1/chat/completions/{completion_id}"
    during = (await http.get(url)).json()
    assert during["status"] == "in_progress"
    assert during["choices"][0]["message"]["content"].startswith(text_of(got))
    assert during["timings"]["started_at"] and during["timings"]["finished_at"] is None
    async with asyncio.timeout(20):
        while (await http.get(url)).json()["status"] == "in_progress":
            await asyncio.sleep(0.1)
    after = (await http.get(url)).json()
    assert after["status"] == "completed"
    assert after["choices"][0]["message"]["content"] == expected(60)
    assert after["usage"]["completion_tokens"] == 60
    assert after["timings"]["finished_at"]
    assert after["conversation_id"]
    missing = await http.get(f"{running.base_url}/v1/chat/completions/chatcmpl-nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_inflight_hash_lists_running_generations(
    running: Stack, http: httpx.AsyncClient
) -> None:
    import redis.asyncio as aioredis

    completion_id, _ = await start_stream(http, running, "#fake tokens=80 delay=0.03", read=40)
    client = aioredis.Redis.from_url(running.env["HAIA_REDIS_URL"])
    try:
        raw = await client.hget("haia:inflight", completion_id)
        assert raw is not None
        entry = json.loads(raw)
        assert entry["model"] == "ollama:fake-model"
        assert entry["status"] == "in_progress"
        assert entry["tokens"] >= 16 and entry["worker"] and entry["conversation"]
        await attach(http, running, completion_id)  # until it ends
        async with asyncio.timeout(5):  # removed right after the end is announced
            while await client.hget("haia:inflight", completion_id) is not None:
                await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def test_cancel_stores_partial_text_and_ends_attached_streams(
    running: Stack, http: httpx.AsyncClient
) -> None:
    completion_id, got = await start_stream(http, running, "#fake tokens=400 delay=0.02", read=5)
    follower = asyncio.create_task(attach(http, running, completion_id, after=last_id(got)))
    await asyncio.sleep(0.3)
    url = f"{running.base_url}/v1/chat/completions/{completion_id}/cancel"
    first = await http.post(url)
    assert first.status_code == 200
    assert first.json()["status"] == "cancelled"
    second = await http.post(url)
    assert second.status_code == 200 and second.json() == first.json()

    rest = await asyncio.wait_for(follower, 10)
    assert rest[-1].data == "[DONE]"
    finish = json.loads(str(rest[-2].data))
    assert finish["choices"][0]["finish_reason"] == "stop"
    partial = text_of(got) + text_of(rest)
    row = await dbcheck.message_by_completion(running.database_url, completion_id)
    assert row["status"] == "cancelled"
    assert row["content"] == partial
    assert expected(400).startswith(partial) and len(partial) < len(expected(400))


async def test_closing_the_connection_never_cancels(
    running: Stack, http: httpx.AsyncClient
) -> None:
    completion_id, _ = await start_stream(http, running, "#fake tokens=30 delay=0.02", read=2)
    row = await dbcheck.wait_for_status(running.database_url, completion_id, {"completed"})
    assert row["content"] == expected(30)


async def test_silent_model_gets_keepalive_comments(
    running: Stack, http: httpx.AsyncClient
) -> None:
    body = {
        "model": "ollama:fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": "#fake tokens=3 first=1.5"}],
    }
    async with http.stream("POST", f"{running.base_url}/v1/chat/completions", json=body) as r:
        got = await read_all(r)
    first_content = next(i for i, f in enumerate(got) if f.data and '"content":"tok' in f.data)
    assert any(f.comment for f in got[:first_content])
    assert text_of(got) == expected(3)


async def test_web_killed_mid_stream_client_resumes_on_a_new_web(
    running: Stack, http: httpx.AsyncClient
) -> None:
    completion_id, got = await start_stream(http, running, "#fake tokens=100 delay=0.03", read=5)
    assert running.web is not None
    running.web.stop(signal.SIGKILL)
    running.start_web()
    rest = await attach(http, running, completion_id, after=last_id(got))
    assert text_of(got) + text_of(rest) == expected(100)
    assert rest[-1].data == "[DONE]"
    row = await dbcheck.message_by_completion(running.database_url, completion_id)
    assert (row["status"], row["content"]) == ("completed", expected(100))


async def test_worker_sigterm_finishes_in_flight_generations(
    running: Stack, http: httpx.AsyncClient
) -> None:
    completion_id, got = await start_stream(http, running, "#fake tokens=60 delay=0.03", read=3)
    assert running.worker is not None
    running.worker.process.send_signal(signal.SIGTERM)
    rest = await attach(http, running, completion_id, after=last_id(got))
    assert text_of(got) + text_of(rest) == expected(60)
    assert running.worker.process.wait(20) == 0
    rows = await dbcheck.query(
        running.database_url,
        "SELECT status, content FROM haia_message WHERE completion_id = $1",
        completion_id,
    )
    assert rows == [{"status": "completed", "content": expected(60)}]  # stored once


async def test_worker_sigterm_past_the_grace_hands_the_job_back(
    make_stack: StackFactory, http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_SHUTDOWN_GRACE="1")
    stack.start_web()
    stack.start_worker()
    completion_id, got = await start_stream(http, stack, "#fake tokens=300 delay=0.03", read=3)
    follower = asyncio.create_task(attach(http, stack, completion_id, after=last_id(got)))
    assert stack.worker is not None
    stack.worker.process.send_signal(signal.SIGTERM)
    stack.worker.process.wait(20)
    stack.start_worker(wait=False)  # the job comes back to the next worker
    rest = await asyncio.wait_for(follower, 30)
    error = json.loads(str(rest[-2].data))["error"]
    assert error["code"] == "generation_interrupted"
    assert rest[-1].data == "[DONE]"
    row = await dbcheck.wait_for_status(stack.database_url, completion_id, {"interrupted"})
    assert row["status"] == "interrupted"
    assert row["content"] == text_of(got) + text_of(rest)


async def test_worker_sigkill_mid_generation_ends_interrupted_within_the_bound(
    running: Stack, http: httpx.AsyncClient
) -> None:
    completion_id, got = await start_stream(http, running, "#fake tokens=1000 delay=0.02", read=5)
    follower = asyncio.create_task(attach(http, running, completion_id, after=last_id(got)))
    await asyncio.sleep(0.2)
    assert running.worker is not None
    running.worker.stop(signal.SIGKILL)  # no worker left: the web notices on its own
    # The web's reaper notices within HAIA_WORKER_DEAD_AFTER (3 s here); the wait only
    # guards against a hang.
    rest = await asyncio.wait_for(follower, 30)
    assert rest[-1].data == "[DONE]"
    assert json.loads(str(rest[-2].data))["error"]["code"] == "generation_interrupted"
    row = await dbcheck.message_by_completion(running.database_url, completion_id)
    assert row["status"] == "interrupted"
    assert row["content"] == text_of(got) + text_of(rest)
    assert row["content"]
    users = await dbcheck.query(
        running.database_url,
        "SELECT m.role FROM haia_message m JOIN haia_message a "
        "ON a.conversation_id = m.conversation_id WHERE a.completion_id = $1 ORDER BY m.id",
        completion_id,
    )
    assert [u["role"] for u in users] == ["user", "assistant"]


async def test_worker_sigkill_before_first_token_reruns_on_another_worker(
    running: Stack, http: httpx.AsyncClient
) -> None:
    import redis.asyncio as aioredis

    running.start_extra_worker()
    body = {
        "model": "ollama:fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": "#fake tokens=20 first=3"}],
    }
    client = aioredis.Redis.from_url(running.env["HAIA_REDIS_URL"])
    try:
        async with http.stream(
            "POST", f"{running.base_url}/v1/chat/completions", json=body
        ) as response:
            async with asyncio.timeout(10):
                while not (entries := await client.hgetall("haia:inflight")):
                    await asyncio.sleep(0.05)
            [entry] = [json.loads(v) for v in entries.values()]
            victim_pid = int(entry["worker"].split(":")[1])
            victim = next(
                p
                for p in (running.worker, *running.extra)
                if p is not None and p.process.pid == victim_pid
            )
            victim.stop(signal.SIGKILL)
            got = await read_all(response)
    finally:
        await client.aclose()
    assert text_of(got) == expected(20)
    assert got[-1].data == "[DONE]"


async def test_cancel_while_queued_with_no_worker(
    make_stack: StackFactory, http: httpx.AsyncClient
) -> None:
    stack = make_stack()
    stack.start_web()
    body = {
        "model": "ollama:fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": "nobody runs me"}],
    }

    async def post() -> list[Frame]:
        async with http.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) as r:
            return await read_all(r)

    poster = asyncio.create_task(post())
    async with asyncio.timeout(10):
        while not (
            rows := await dbcheck.query(
                stack.database_url,
                "SELECT completion_id FROM haia_message WHERE status = 'queued' "
                "AND content = '' ORDER BY id DESC LIMIT 1",
            )
        ):
            await asyncio.sleep(0.05)
    completion_id = rows[0]["completion_id"]
    cancelled = await http.post(f"{stack.base_url}/v1/chat/completions/{completion_id}/cancel")
    assert cancelled.json()["status"] == "cancelled"
    got = await asyncio.wait_for(poster, 10)
    assert got[-1].data == "[DONE]"
    assert json.loads(str(got[-2].data))["choices"][0]["finish_reason"] == "stop"


async def test_redis_restart_gives_503_then_recovers(
    make_stack: StackFactory, http: httpx.AsyncClient, tmp_path: Any
) -> None:
    from app.embedded_redis import start_embedded, stop_embedded
    from tests.procs import free_port

    port = free_port()
    server = start_embedded(tmp_path, port=port)
    stack = make_stack(redis_url=f"redis://127.0.0.1:{port}/0")
    try:
        stack.start_web()
        stack.start_worker()
        body = {"model": "ollama:fake-model", "messages": [{"role": "user", "content": "hi"}]}
        url = f"{stack.base_url}/v1/chat/completions"
        assert (await http.post(url, json=body)).status_code == 200
        streaming = asyncio.create_task(
            start_stream(http, stack, "#fake tokens=500 delay=0.02", read=10_000)
        )
        await asyncio.sleep(1.0)
        stop_embedded(server)
        _, cut = await asyncio.wait_for(streaming, 20)  # ends, with an error chunk
        assert cut[-1].data == "[DONE]"
        assert json.loads(str(cut[-2].data))["error"]["code"] == "service_unavailable"
        down = await http.post(url, json=body)
        assert down.status_code == 503
        assert set(down.json()["error"]) == {"message", "type", "param", "code"}
        assert (await http.get(f"{stack.base_url}/health")).status_code == 503
        server = start_embedded(tmp_path, port=port)
        async with asyncio.timeout(30):
            while (await http.get(f"{stack.base_url}/health")).status_code != 200:
                await asyncio.sleep(0.2)
        again = await http.post(url, json=body)
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["message"]["content"] == "Echo: hi"
    finally:
        stack.stop()
        stop_embedded(server)
