"""More than one web process: HAIA_WEB_WORKERS on one port, and two webs on two ports with two
workers, one Redis and one database. Whichever process a request lands on, it works."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from tests import dbcheck
from tests.procs import Stack, free_port, wait_until
from tests.sse import Frame
from tests.test_e2e_durability import attach, expected, last_id, start_stream, text_of

pytestmark = pytest.mark.e2e

StackFactory = Callable[..., Stack]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # No keep-alive: every request opens a new connection, which any web process may accept.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=30), limits=limits) as client:
        yield client


def child_pids(stack: Stack) -> list[str]:
    assert stack.web is not None
    main = stack.web.process.pid
    return Path(f"/proc/{main}/task/{main}/children").read_text().split()


async def web_processes(stack: Stack) -> int:
    """This stack's web processes subscribed to Redis (each holds a `haia:web:{pid}:…` channel;
    channels are server-wide, so other tests' webs are told apart by their pids)."""
    children = child_pids(stack)
    client = aioredis.Redis.from_url(stack.env["HAIA_REDIS_URL"])
    try:
        channels = await client.pubsub_channels("haia:web:*")
    finally:
        await client.aclose()
    return len([c for c in channels if c.decode().split(":")[2] in children])


def transcript(frames: list[Frame]) -> list[tuple[str | None, str | None]]:
    return [(f.id, f.data) for f in frames if f.id is not None]


async def resume_in_pieces(
    http: httpx.AsyncClient, webs: list[Stack], completion_id: str, first: list[Frame]
) -> list[Frame]:
    """Resume from where `first` stopped, a few events at a time, on each web in turn."""
    received = list(first)
    turn = 0
    while received[-1].data != "[DONE]":
        web = webs[turn % len(webs)]
        received += await attach(http, web, completion_id, after=last_id(received), limit=7)
        turn += 1
    return received


async def test_web_workers_serve_chats_resume_and_cancel(
    make_stack: StackFactory, http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_WEB_WORKERS="2", HAIA_KEEPALIVE_INTERVAL="0.3")
    stack.start_web()
    stack.start_worker()
    async with asyncio.timeout(10):
        while await web_processes(stack) != 2:
            await asyncio.sleep(0.1)

    body = {"model": "ollama:fake-model", "messages": [{"role": "user", "content": "hi"}]}
    answers = await asyncio.gather(
        *(http.post(f"{stack.base_url}/v1/chat/completions", json=body) for _ in range(6))
    )
    assert [a.json()["choices"][0]["message"]["content"] for a in answers] == ["Echo: hi"] * 6

    completion_id, first = await start_stream(http, stack, "#fake tokens=60 delay=0.02", read=4)
    received = await resume_in_pieces(http, [stack], completion_id, first)
    assert text_of(received) == expected(60)
    whole = await attach(http, stack, completion_id)
    assert transcript(whole) == transcript(received)

    completion_id, _ = await start_stream(http, stack, "#fake tokens=400 delay=0.02", read=3)
    cancelled = await http.post(f"{stack.base_url}/v1/chat/completions/{completion_id}/cancel")
    assert cancelled.json()["status"] == "cancelled"
    row = await dbcheck.wait_for_status(stack.database_url, completion_id, {"cancelled"})
    assert expected(400).startswith(row["content"]) and len(row["content"]) < len(expected(400))


@pytest.fixture
def two_webs(make_stack: StackFactory) -> tuple[Stack, Stack]:
    """Two webs on two ports and two workers, on one Redis and one database."""
    one = make_stack(HAIA_KEEPALIVE_INTERVAL="0.3")
    one.start_web()
    one.start_worker()
    one.start_extra_worker()
    port = free_port()
    two = Stack(
        base_url=f"http://127.0.0.1:{port}",
        env={**one.env, "HAIA_PORT": str(port)},
        log_dir=one.log_dir,
        database_url=one.database_url,
        upstream_url=one.upstream_url,
    )
    one.extra.append(two.start_web())  # stopped with the first stack
    return one, two


async def test_a_stream_started_on_one_web_resumes_byte_exact_on_the_other(
    two_webs: tuple[Stack, Stack], http: httpx.AsyncClient
) -> None:
    one, two = two_webs
    completion_id, first = await start_stream(http, one, "#fake tokens=80 delay=0.02", read=5)
    rest = await attach(http, two, completion_id, after=last_id(first))
    assert rest[-1].data == "[DONE]"
    assert text_of(first) + text_of(rest) == expected(80)
    ids = [int(f.id) for f in first + rest if f.id is not None]
    assert ids == list(range(ids[0], ids[-1] + 1)), "a gap or a repeat between the two webs"
    from_one = await attach(http, one, completion_id)
    from_two = await attach(http, two, completion_id)
    assert transcript(from_one) == transcript(from_two) == transcript(first + rest)

    completion_id, first = await start_stream(http, two, "#fake tokens=60 delay=0.02", read=3)
    pieces = await resume_in_pieces(http, [one, two], completion_id, first)
    assert text_of(pieces) == expected(60)
    assert transcript(pieces) == transcript(await attach(http, one, completion_id))


async def test_a_cancel_sent_to_one_web_stops_a_generation_started_on_the_other(
    two_webs: tuple[Stack, Stack], http: httpx.AsyncClient
) -> None:
    one, two = two_webs
    completion_id, got = await start_stream(http, two, "#fake tokens=400 delay=0.02", read=5)
    follower = asyncio.create_task(attach(http, two, completion_id, after=last_id(got)))
    await asyncio.sleep(0.3)
    cancelled = await http.post(f"{one.base_url}/v1/chat/completions/{completion_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    rest = await asyncio.wait_for(follower, 10)
    assert rest[-1].data == "[DONE]"
    assert json.loads(str(rest[-2].data))["choices"][0]["finish_reason"] == "stop"
    row = await dbcheck.message_by_completion(one.database_url, completion_id)
    assert row["status"] == "cancelled"
    assert row["content"] == text_of(got) + text_of(rest)
    assert len(row["content"]) < len(expected(400))


async def test_one_scrape_of_either_web_covers_every_process(
    two_webs: tuple[Stack, Stack], http: httpx.AsyncClient
) -> None:
    one, two = two_webs
    body = {"model": "ollama:fake-model", "messages": [{"role": "user", "content": "hi"}]}
    for web in (one, two, two):
        assert (await http.post(f"{web.base_url}/v1/chat/completions", json=body)).is_success

    def generations(text: str) -> tuple[str, ...]:
        return tuple(
            line
            for line in text.splitlines()
            if line.startswith(("haia_generations_total", "haia_workers "))
        )

    wait_until(
        lambda: "haia_workers 2.0" in httpx.get(f"{one.base_url}/metrics").text, 10, "2 workers"
    )
    scraped_one = generations((await http.get(f"{one.base_url}/metrics")).text)
    scraped_two = generations((await http.get(f"{two.base_url}/metrics")).text)
    assert scraped_one == scraped_two
    assert 'haia_generations_total{model="ollama:fake-model",status="completed"} 3.0' in scraped_one


async def test_web_workers_all_stop_on_sigterm(make_stack: StackFactory) -> None:
    """SIGTERM to `web` with HAIA_WEB_WORKERS=2 ends every web process, none left serving."""
    stack = make_stack(HAIA_WEB_WORKERS="2")
    web = stack.start_web()
    async with asyncio.timeout(20):
        while await web_processes(stack) != 2:
            await asyncio.sleep(0.1)
    web.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(web.process.wait, 30) == 0
    async with asyncio.timeout(10):  # the process group empties: no orphaned worker
        while True:
            try:
                os.killpg(web.process.pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.1)
