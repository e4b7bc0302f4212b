"""Every generation ends, once, with its text: busy workers, database outages, timeouts, lost
jobs and reapers that die. Real web and worker processes, real Redis and databases."""

from __future__ import annotations

import asyncio
import json
import pickle
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests import dbcheck
from tests.procs import Stack, spawn, wait_until
from tests.proxy import database_behind_proxy
from tests.sse import Frame, frames, read_all
from tests.test_e2e_durability import attach, expected, last_id, start_stream, text_of

pytestmark = pytest.mark.e2e

StackFactory = Callable[..., Stack]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=60)) as client:
        yield client


def stream_body(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "ollama:fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


async def stream(http: httpx.AsyncClient, stack: Stack, content: str) -> list[Frame]:
    url = f"{stack.base_url}/v1/chat/completions"
    async with http.stream("POST", url, json=stream_body(content)) as response:
        assert response.status_code == 200, await response.aread()
        return await read_all(response)


def finish_of(received: list[Frame]) -> str | None:
    for frame in received:
        if frame.data and frame.data.startswith("{") and "choices" in frame.data:
            for choice in frame.json()["choices"]:
                if choice.get("finish_reason"):
                    return str(choice["finish_reason"])
    return None


def error_of(received: list[Frame]) -> dict[str, Any] | None:
    for frame in received:
        if frame.data and frame.data.startswith('{"error"'):
            return dict(frame.json()["error"])
    return None


async def test_a_busy_worker_is_not_taken_for_dead(
    make_stack: StackFactory, http: httpx.AsyncClient, log_dir: Path
) -> None:
    """The worker's event loop is blocked for 2.5x HAIA_WORKER_DEAD_AFTER mid-generation (a
    slow delta callback): the reaper must not end it, and the answer arrives whole."""
    stack = make_stack(
        HAIA_WORKER_DEAD_AFTER="2",
        HAIA_TEST_BLOCK_AT="5",
        HAIA_TEST_BLOCK_SECONDS="5",
    )
    stack.start_web()
    stack.worker = spawn("slow-worker", ["python", "-m", "tests.slow_worker"], stack.env, log_dir)
    wait_until(stack.healthy, 30, "slow worker", [stack.worker])
    received = await stream(http, stack, "#fake tokens=20 delay=0.01")
    assert error_of(received) is None, received[-3:]
    assert text_of(received) == expected(20)
    assert finish_of(received) == "stop" and received[-1].data == "[DONE]"
    completion_id = json.loads(str(received[0].data))["id"]
    row = await dbcheck.wait_for_status(stack.database_url, completion_id, {"completed"})
    assert (row["status"], row["content"]) == ("completed", expected(20))
    assert stack.web is not None and "lost its worker" not in stack.web.log()


async def test_database_down_at_the_final_write_loses_nothing(
    make_stack: StackFactory, http: httpx.AsyncClient, database_url: str
) -> None:
    """PostgreSQL goes away for 3 s while an answer streams, so the final write fails: the
    client still gets every token and `[DONE]`, and the answer is in the conversation after."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite is a file inside the process: there is no server to stop")
    proxy, through_proxy = await database_behind_proxy(database_url)
    stack = make_stack(HAIA_DATABASE_URL=through_proxy)
    try:
        await asyncio.to_thread(stack.start_web)
        await asyncio.to_thread(stack.start_worker)
        url = f"{stack.base_url}/v1/chat/completions"
        received: list[Frame] = []
        async with http.stream(
            "POST", url, json=stream_body("#fake tokens=40 delay=0.05")
        ) as response:
            assert response.status_code == 200
            conversation_id = response.headers["x-conversation-id"]
            async for frame in frames(response):
                received.append(frame)
                if len(received) == 4:
                    await proxy.stop()  # the database is gone from here on
                    asyncio.get_running_loop().call_later(
                        3.0, lambda: asyncio.ensure_future(proxy.start())
                    )
        assert received[-1].data == "[DONE]"
        assert error_of(received) is None
        assert text_of(received) == expected(40) and finish_of(received) == "stop"
        completion_id = json.loads(str(received[0].data))["id"]
        row = await dbcheck.wait_for_status(database_url, completion_id, {"completed"}, 60)
        assert (row["status"], row["content"]) == ("completed", expected(40))

        # The next turn's context holds the answer between the two user messages.
        await stack.forget_upstream_requests()
        following = await http.post(
            url,
            json={**stream_body("and then?"), "stream": False},
            headers={"X-Conversation-ID": conversation_id},
        )
        assert following.status_code == 200, following.text
        [request] = await stack.upstream_requests()
        roles = [(m["role"], m["content"]) for m in request["body"]["messages"]]
        assert roles[-3:] == [
            ("user", "#fake tokens=40 delay=0.05"),
            ("assistant", expected(40)),
            ("user", "and then?"),
        ]
    finally:
        stack.stop()
        await proxy.stop()


async def test_a_generation_past_the_job_timeout_ends_with_its_text(
    make_stack: StackFactory, http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_JOB_TIMEOUT="10", HAIA_LLM_TIMEOUT="60")
    stack.start_web()
    stack.start_worker()
    received = await stream(http, stack, "#fake tokens=1000 delay=0.05")
    error = error_of(received)
    assert error is not None and error["code"] == "generation_timeout", received[-3:]
    assert received[-1].data == "[DONE]"
    completion_id = json.loads(str(received[0].data))["id"]
    row = await dbcheck.wait_for_status(stack.database_url, completion_id, {"failed"})
    assert row["status"] == "failed"
    assert row["content"] == text_of(received) and row["content"].startswith("tok0 tok1 ")


async def test_a_reaper_that_dies_between_claim_and_end_leaves_nothing_stuck(
    make_stack: StackFactory, http: httpx.AsyncClient
) -> None:
    """The worker is SIGKILLed mid-stream and its in-flight entry disappears, as when a reaper
    claims it and dies before ending it: the sweep still ends it, and attached clients hear."""
    stack = make_stack(HAIA_WORKER_DEAD_AFTER="2")
    stack.start_web()
    stack.start_worker()
    completion_id, got = await start_stream(http, stack, "#fake tokens=1000 delay=0.02", read=5)
    follower = asyncio.create_task(attach(http, stack, completion_id, after=last_id(got)))
    client = aioredis.Redis.from_url(stack.env["HAIA_REDIS_URL"])
    try:
        assert stack.worker is not None
        stack.worker.stop(signal.SIGKILL)
        assert await client.hdel("haia:inflight", completion_id) == 1  # the reaper's claim
    finally:
        await client.aclose()
    rest = await asyncio.wait_for(follower, 60)  # the sweep's bound; only guards a hang
    assert rest[-1].data == "[DONE]"
    error = error_of(rest)
    assert error is not None and error["code"] == "generation_interrupted"
    row = await dbcheck.wait_for_status(stack.database_url, completion_id, {"interrupted"})
    assert row["status"] == "interrupted"
    assert row["content"] == text_of(got) + text_of(rest)


async def test_a_turn_whose_job_was_never_enqueued_is_ended(
    make_stack: StackFactory, http: httpx.AsyncClient
) -> None:
    """The web dies after storing the turn and before its job reached the queue."""
    stack = make_stack(HAIA_QUEUE_TIMEOUT="120", HAIA_WORKER_DEAD_AFTER="2")
    stack.start_web()  # no worker: the job waits
    poster = asyncio.create_task(stream(http, stack, "never enqueued"))
    async with asyncio.timeout(10):
        while not (
            rows := await dbcheck.query(
                stack.database_url,
                "SELECT completion_id FROM haia_message WHERE status = 'queued'",
            )
        ):
            await asyncio.sleep(0.05)
    completion_id = rows[0]["completion_id"]
    assert stack.web is not None
    stack.web.stop(signal.SIGKILL)
    with pytest.raises(httpx.HTTPError):
        await poster
    client = aioredis.Redis.from_url(stack.env["HAIA_REDIS_URL"])
    try:  # as if the enqueue had never happened
        await client.zrem("haia:queue", completion_id)
        await client.delete(f"arq:job:{completion_id}", "haia:inflight")
    finally:
        await client.aclose()
    stack.start_web()
    stack.start_worker()
    row = await dbcheck.wait_for_status(stack.database_url, completion_id, {"failed"}, 60)
    assert row["status"] == "failed"
    assert "no_worker" in str(row["error"])
    frames_ = await attach(http, stack, completion_id)
    assert frames_[-1].data == "[DONE]" and error_of(frames_) is not None


async def test_a_job_that_does_not_decode_is_refused_and_its_turn_ended(
    make_stack: StackFactory, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Jobs cross Redis as JSON: a pickled job (what anyone with write access to Redis could
    plant) is not run, and a stored turn whose job is unreadable still ends."""
    stack = make_stack(HAIA_QUEUE_TIMEOUT="120", HAIA_WORKER_DEAD_AFTER="2")
    stack.start_web()  # no worker yet
    client = aioredis.Redis.from_url(stack.env["HAIA_REDIS_URL"])
    planted = tmp_path / "planted"
    try:
        url = f"{stack.base_url}/v1/chat/completions"
        poster = asyncio.create_task(http.post(url, json=stream_body("my job gets mangled")))
        async with asyncio.timeout(10):
            while not (ids := await client.zrange("haia:queue", 0, -1)):
                await asyncio.sleep(0.05)
        completion_id = ids[0].decode()
        await client.set(f"arq:job:{completion_id}", b"\x80\x04not json at all")
        payload = pickle.dumps(_Planted(str(planted)))
        await client.set("arq:job:evil", payload)
        await client.zadd("haia:queue", {"evil": 1})
        stack.start_worker()
        answer = await asyncio.wait_for(poster, 60)  # the sweep's bound; only guards a hang
    finally:
        await client.aclose()
    # Ended before any worker started it: the client gets the error as an HTTP status.
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "no_worker"
    assert not planted.exists()
    assert stack.worker is not None
    assert "deserializing job evil failed" in stack.worker.log()
    row = await dbcheck.wait_for_status(stack.database_url, completion_id, {"failed"})
    assert row["status"] == "failed"


class _Planted:
    """Unpickling this would create a file: the proof that a pickled job ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


async def test_more_streams_than_slots_wait_in_order_and_all_arrive_whole(
    make_stack: StackFactory, http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_WORKER_MAX_JOBS="2")
    stack.start_web()
    stack.start_worker()
    client = aioredis.Redis.from_url(stack.env["HAIA_REDIS_URL"])
    seen_queued = False

    async def watch() -> None:
        nonlocal seen_queued
        while not seen_queued:
            entries = [json.loads(v) for v in (await client.hgetall("haia:inflight")).values()]
            seen_queued = any(e["status"] == "queued" for e in entries)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(
            *(stream(http, stack, f"#fake tokens=10 delay=0.05 n={i}") for i in range(6))
        )
    finally:
        watcher.cancel()
        await client.aclose()
    for received in results:
        assert error_of(received) is None
        assert text_of(received) == expected(10) and received[-1].data == "[DONE]"
    assert seen_queued, "waiting generations are listed in haia:inflight as queued"
