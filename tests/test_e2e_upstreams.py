"""Several upstreams end to end: discovery, bare names, aliases and fallbacks, fair sharing.

Real processes: three fake model servers with different model lists (one slow to list its
models), one address where nothing listens (a box that is off), HAIA's web and worker.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from openai import AsyncOpenAI

from tests import dbcheck
from tests.conftest import REDIS_BASE, stack_env
from tests.procs import Proc, Stack, free_port, spawn, wait_until
from tests.sse import Frame, content_of, read_all

pytestmark = pytest.mark.e2e

LONG = "#fake tokens=40 delay=0.1"
"""A generation of about four seconds: long enough for others to line up behind it."""


@dataclass
class Fakes:
    gpubox: str
    laptop: str
    slowbox: str
    offbox_port: int


def _fake(log_dir: Path, name: str, port: int, *args: str) -> Proc:
    command = ["python", "-m", "tests.fake_upstream", str(port), *args]
    proc = spawn(name, command, {}, log_dir)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/_requests").status_code == 200, 30, name, [proc])
    return proc


@pytest.fixture(scope="module")
def fakes(log_dir: Path) -> Iterator[Fakes]:
    ports = [free_port() for _ in range(4)]
    procs = [
        _fake(log_dir, "fake-gpubox", ports[0], "--models", "llama3.2,qwen3:8b,shared"),
        _fake(log_dir, "fake-laptop", ports[1], "--models", "phi4,shared"),
        _fake(log_dir, "fake-slowbox", ports[2], "--models", "slow", "--models-delay", "60"),
    ]
    url = "http://127.0.0.1:{}".format
    yield Fakes(url(ports[0]), url(ports[1]), url(ports[2]), ports[3])
    for proc in procs:
        proc.stop()


def _env(fakes: Fakes, anthropic: str, port: int, database_url: str, db: int) -> dict[str, str]:
    env = stack_env(
        port=port, database_url=database_url, upstream=anthropic, redis_url=f"{REDIS_BASE}/{db}"
    )
    for name in ("HAIA_MODELS", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        del env[name]
    return {
        **env,
        "OLLAMA_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",  # the built-in Ollama is off
        "HAIA_MODEL": "gpubox:llama3.2",
        "HAIA_UPSTREAM_GPUBOX": f"ollama:{fakes.gpubox}/v1",
        "HAIA_UPSTREAM_GPUBOX_MAX_CONCURRENT": "1",
        "HAIA_UPSTREAM_LAPTOP": f"openai-chat:{fakes.laptop}/v1",
        "HAIA_UPSTREAM_LAPTOP_API_KEY": "lm-studio-key",
        "HAIA_UPSTREAM_SLOWBOX": f"ollama:{fakes.slowbox}/v1",
        "HAIA_UPSTREAM_OFFBOX": f"ollama:http://127.0.0.1:{fakes.offbox_port}/v1",
        "HAIA_ALIASES": (
            "fast=gpubox:llama3.2,smart=offbox:big|laptop:phi4,"
            "careful=anthropic:claude-fake|laptop:phi4,twice=laptop:phi4|gpubox:llama3.2"
        ),
    }


def _make(log_dir: Path, env: dict[str, str], database_url: str, upstream: str) -> Stack:
    redis.Redis.from_url(env["HAIA_REDIS_URL"]).flushdb()
    stack = Stack(
        base_url=f"http://127.0.0.1:{env['HAIA_PORT']}",
        env=env,
        log_dir=log_dir,
        database_url=database_url,
        upstream_url=upstream,
    )
    stack.start_web()
    stack.start_worker()
    return stack


@pytest.fixture(scope="module")
def lab(database_url: str, fakes: Fakes, fake_upstream: str, log_dir: Path) -> Iterator[Stack]:
    """HAIA over every fake: gpubox (one at a time), laptop, slowbox, offbox (off), and the
    built-in anthropic on the shared fake."""
    env = _env(fakes, fake_upstream, free_port(), database_url, 14)
    stack = _make(log_dir, env, database_url, fake_upstream)
    yield stack
    stack.stop()


@pytest.fixture
def tight(database_url: str, fakes: Fakes, fake_upstream: str, log_dir: Path) -> Iterator[Stack]:
    """The same, with a short queue timeout and quick death detection."""
    env = {
        **_env(fakes, fake_upstream, free_port(), database_url, 15),
        "HAIA_QUEUE_TIMEOUT": "5",
        "HAIA_WORKER_DEAD_AFTER": "2",
        "HAIA_KEEPALIVE_INTERVAL": "1",  # the web checks its queue timeout when silent
    }
    stack = _make(log_dir, env, database_url, fake_upstream)
    yield stack
    stack.stop()


@pytest.fixture
async def http(fakes: Fakes, fake_upstream: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60) as client:
        for fake in (fakes.gpubox, fakes.laptop, fake_upstream):  # each test sees its own
            await client.delete(f"{fake}/_requests")
        yield client


@pytest.fixture
async def rds(lab: Stack) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(lab.env["HAIA_REDIS_URL"], decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def sdk(lab: Stack) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=f"{lab.base_url}/v1", api_key="x", max_retries=0) as client:
        yield client


async def _ids(http: httpx.AsyncClient, stack: Stack) -> list[str]:
    models = (await http.get(f"{stack.base_url}/v1/models")).json()["data"]
    return [model["id"] for model in models]


async def _until(check: Callable[[], Awaitable[bool]], what: str, within: float = 40) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _chat(http: httpx.AsyncClient, stack: Stack, model: str, text: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return await http.post(f"{stack.base_url}/v1/chat/completions", json=body)


async def _stream(http: httpx.AsyncClient, stack: Stack, model: str, text: str) -> list[Frame]:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": text}]}
    async with http.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        return await read_all(r)


async def _asked(http: httpx.AsyncClient, fake: str, text: str) -> list[dict[str, Any]]:
    """The chat requests `fake` received whose last message is `text`."""
    received = (await http.get(f"{fake}/_requests")).json()
    return [
        r["body"]
        for r in received
        if r["body"].get("messages") and r["body"]["messages"][-1].get("content") == text
    ]


async def _get(http: httpx.AsyncClient, stack: Stack, completion_id: str) -> dict[str, Any]:
    response = await http.get(f"{stack.base_url}/v1/chat/completions/{completion_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


# Discovery


async def test_every_reachable_upstream_is_listed(
    lab: Stack, http: httpx.AsyncClient, sdk: AsyncOpenAI
) -> None:
    models = (await sdk.models.list()).data
    ids = [model.id for model in models]
    assert ids[0] == "gpubox:llama3.2"  # HAIA_MODEL: the default, first; not the only one
    assert sorted(ids) == sorted(
        [
            "gpubox:llama3.2",
            "gpubox:qwen3:8b",
            "gpubox:shared",
            "laptop:phi4",
            "laptop:shared",
            "anthropic:claude-fake",
            "fast",
            "smart",
            "careful",
            "twice",
        ]
    )  # not slowbox (too slow to answer), offbox (off), the built-in ollama (off)
    owners = {model.id: model.owned_by for model in models}
    assert (owners["laptop:phi4"], owners["anthropic:claude-fake"], owners["smart"]) == (
        "laptop",
        "anthropic",
        "haia",
    )

    async def reported() -> bool:  # the silent one once its probe timed out
        health = (await http.get(f"{lab.base_url}/health")).json()["checks"]["upstream"]
        assert health["status"] == "ok"
        return "offbox" in health["detail"] and "slowbox" in health["detail"]

    await _until(reported, "/health naming the upstreams that did not answer")


async def test_an_upstream_is_listed_once_it_answers(
    lab: Stack, fakes: Fakes, log_dir: Path, http: httpx.AsyncClient
) -> None:
    assert not [i for i in await _ids(http, lab) if i.startswith("offbox:")]
    proc = _fake(log_dir, "fake-offbox", fakes.offbox_port, "--models", "big")
    try:

        async def listed() -> bool:
            return "offbox:big" in await _ids(http, lab)

        await _until(listed, "offbox:big in /v1/models")
        # Now up, it is the first of `smart` and answers.
        response = await _chat(http, lab, "smart", "who answers now")
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "offbox:big"
    finally:
        proc.stop()

    async def gone() -> bool:
        return "offbox:big" not in await _ids(http, lab)

    await _until(gone, "offbox:big gone from /v1/models")


async def test_bare_names_resolve_when_one_upstream_offers_them(
    lab: Stack, fakes: Fakes, http: httpx.AsyncClient
) -> None:
    response = await _chat(http, lab, "phi4", "bare phi")
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "laptop:phi4"

    # `qwen3` is no upstream: `qwen3:8b` is a bare (Ollama-style) name.
    response = await _chat(http, lab, "qwen3:8b", "bare qwen")
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "gpubox:qwen3:8b"
    assert [body["model"] for body in await _asked(http, fakes.gpubox, "bare qwen")] == ["qwen3:8b"]

    response = await _chat(http, lab, "shared", "which one")
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert "gpubox:shared" in error["message"] and "laptop:shared" in error["message"]

    for unknown in ("gpubox:nope", "nope"):
        response = await _chat(http, lab, unknown, "x")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"

    # An upstream that could not list its models is still asked when named.
    response = await _chat(http, lab, "slowbox:slow", "slow box")
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "slowbox:slow"


# Aliases and fallbacks


async def test_alias_falls_back_when_the_first_is_down(
    lab: Stack, fakes: Fakes, http: httpx.AsyncClient, sdk: AsyncOpenAI
) -> None:
    stream = await sdk.chat.completions.create(
        model="smart", stream=True, messages=[{"role": "user", "content": "fall back"}]
    )
    chunks = [chunk async for chunk in stream]
    assert {chunk.model for chunk in chunks} == {"laptop:phi4"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Echo: fall back"
    )
    completion_id = chunks[0].id
    assert (await _get(http, lab, completion_id))["model"] == "laptop:phi4"
    stored = await dbcheck.message_by_completion(lab.database_url, completion_id)
    assert (stored["model"], stored["status"]) == ("laptop:phi4", "completed")
    asked = await _asked(http, fakes.laptop, "fall back")
    assert [body["model"] for body in asked] == ["phi4"]

    completion = await sdk.chat.completions.create(
        model="smart", messages=[{"role": "user", "content": "fall back again"}]
    )
    assert completion.model == "laptop:phi4"
    assert completion.choices[0].message.content == "Echo: fall back again"


async def test_a_background_task_falls_back_too(
    lab: Stack, fakes: Fakes, http: httpx.AsyncClient
) -> None:
    text = "### Task:\nSuggest 3 follow-up questions."
    response = await _chat(http, lab, "smart", text)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "laptop:phi4"
    assert [body["model"] for body in await _asked(http, fakes.laptop, text)] == ["phi4"]


@pytest.mark.parametrize(
    ("alias", "directive", "failing", "answering"),
    [
        ("careful", "status=529 only=claude-fake", "anthropic", "laptop:phi4"),
        ("careful", "status=503 only=claude-fake", "anthropic", "laptop:phi4"),
        ("careful", "status=429 retry_after=1 only=claude-fake", "anthropic", "laptop:phi4"),
        ("twice", "status=429 only=phi4", "laptop", "gpubox:llama3.2"),
        ("twice", "status=503 only=phi4", "laptop", "gpubox:llama3.2"),
        ("twice", "status=500 only=phi4", "laptop", "gpubox:llama3.2"),
    ],
)
async def test_alias_falls_back_before_the_first_token(
    lab: Stack,
    fakes: Fakes,
    http: httpx.AsyncClient,
    alias: str,
    directive: str,
    failing: str,
    answering: str,
) -> None:
    text = f"#fake {directive} ({alias})"
    frames = await _stream(http, lab, alias, text)
    chunks = [frame.json() for frame in frames if frame.data and frame.data != "[DONE]"]
    assert {chunk["model"] for chunk in chunks} == {answering}
    assert content_of(frames) == f"Echo: ({alias})"  # the directive is not echoed
    stored = await dbcheck.message_by_completion(lab.database_url, chunks[0]["id"])
    assert (stored["model"], stored["status"]) == (answering, "completed")
    failing_url = fakes.laptop if failing == "laptop" else lab.upstream_url
    received = (await http.get(f"{failing_url}/_requests")).json()
    tried = [r for r in received if text in json.dumps(r["body"])]
    assert len(tried) == 1  # no retry of the failing one: its fallback answers at once


async def test_no_fallback_once_text_was_sent(
    lab: Stack, fakes: Fakes, http: httpx.AsyncClient
) -> None:
    text = "#fake tokens=5 midfail=2 only=phi4"
    frames = await _stream(http, lab, "twice", text)
    assert content_of(frames) == "tok0 tok1 "
    errors = [f.json() for f in frames if f.data and f.data != "[DONE]" and "error" in f.json()]
    assert len(errors) == 1
    first = frames[0].json()
    assert first["model"] == "laptop:phi4"
    stored = await dbcheck.message_by_completion(lab.database_url, first["id"])
    assert (stored["model"], stored["status"], stored["content"]) == (
        "laptop:phi4",
        "failed",
        "tok0 tok1 ",
    )
    assert await _asked(http, fakes.gpubox, text) == []


# Fair sharing


async def _slot_holders(rds: aioredis.Redis) -> dict[str, str]:
    return dict(await cast(Awaitable[dict[str, str]], rds.hgetall("haia:upstream:gpubox:running")))


async def _waiting(rds: aioredis.Redis) -> list[str]:
    return list(await rds.zrange("haia:upstream:gpubox:waiting", 0, -1))


async def _line_up(
    http: httpx.AsyncClient, stack: Stack, rds: aioredis.Redis, texts: list[str]
) -> tuple[list[asyncio.Task[list[Frame]]], list[str]]:
    """Start one stream per text on gpubox, each only once the one before it is running or
    waiting: their arrival order is known. Returns the tasks and the waiting ids in order."""
    tasks = []
    for index, text in enumerate(texts):
        tasks.append(asyncio.create_task(_stream(http, stack, "fast", text)))

        async def arrived(count: int = index) -> bool:
            return len(await _slot_holders(rds)) + len(await _waiting(rds)) > count

        await _until(arrived, f"stream {index} on gpubox")
    return tasks, await _waiting(rds)


async def test_one_slot_three_streams_in_arrival_order(
    lab: Stack, fakes: Fakes, http: httpx.AsyncClient, rds: aioredis.Redis
) -> None:
    texts = [f"{LONG} first", "#fake tokens=3 second", "#fake tokens=3 third"]
    tasks, waiting = await _line_up(http, lab, rds, texts)
    assert len(waiting) == 2
    [running] = list(await _slot_holders(rds))
    assert (await _get(http, lab, running))["status"] == "in_progress"
    for completion_id in waiting:
        assert (await _get(http, lab, completion_id))["status"] == "queued"
        raw = await cast(Awaitable[str | None], rds.hget("haia:inflight", completion_id))
        entry = json.loads(raw or "{}")
        assert (entry["status"], entry["waiting_for"]) == ("queued", "gpubox")
    metrics = (await http.get(f"{lab.base_url}/metrics")).text
    assert 'haia_upstream_waiting{upstream="gpubox"} 2.0' in metrics
    assert 'haia_upstream_running{upstream="gpubox"} 1.0' in metrics

    results = await asyncio.gather(*tasks)
    ids = [frames[0].json()["id"] for frames in results]
    assert ids == [running, *waiting]
    assert [content_of(frames) for frames in results] == [
        " ".join(f"tok{i}" for i in range(40)) + " ",
        "tok0 tok1 tok2 ",
        "tok0 tok1 tok2 ",
    ]
    done = [await _get(http, lab, completion_id) for completion_id in ids]
    assert [c["status"] for c in done] == ["completed"] * 3
    for before, after in itertools.pairwise(done):  # one at a time, in arrival order
        started = datetime.fromisoformat(after["timings"]["started_at"])
        assert started >= datetime.fromisoformat(before["timings"]["finished_at"])
    order = [body["messages"][-1]["content"] for body in await _asked_all(http, fakes.gpubox)]
    assert [text for text in order if text in texts] == texts
    assert await _waiting(rds) == []


async def _asked_all(http: httpx.AsyncClient, fake: str) -> list[dict[str, Any]]:
    return [r["body"] for r in (await http.get(f"{fake}/_requests")).json()]


async def test_a_waiting_generation_can_be_cancelled(
    lab: Stack, http: httpx.AsyncClient, rds: aioredis.Redis
) -> None:
    tasks, [waiting] = await _line_up(http, lab, rds, [f"{LONG} hold", "#fake tokens=3 never"])
    cancelled = await http.post(f"{lab.base_url}/v1/chat/completions/{waiting}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    frames = await tasks[1]
    assert frames[-1].data == "[DONE]" and content_of(frames) == ""

    async def left() -> bool:
        return waiting not in await _waiting(rds)

    await _until(left, "the cancelled one out of the line")
    first = await tasks[0]
    assert content_of(first).startswith("tok0 ")
    stored = await dbcheck.message_by_completion(lab.database_url, waiting)
    assert (stored["status"], stored["content"]) == ("cancelled", "")

    async def freed() -> bool:  # given back right after the holder's end is announced
        return await _slot_holders(rds) == {}

    await _until(freed, "the slot given back")


async def test_a_waiting_generation_times_out_with_the_queue_503(
    tight: Stack, fakes: Fakes, http: httpx.AsyncClient
) -> None:
    rds = aioredis.Redis.from_url(tight.env["HAIA_REDIS_URL"], decode_responses=True)
    try:
        hold = asyncio.create_task(
            _stream(http, tight, "fast", "#fake tokens=100 delay=0.1 holds it")
        )

        async def held() -> bool:
            return len(await _slot_holders(rds)) == 1

        await _until(held, "the slot taken")
        response = await _chat(http, tight, "fast", "#fake tokens=3 too late")
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "no_worker"
        assert "HAIA_UPSTREAM_GPUBOX_MAX_CONCURRENT" in error["message"]

        async def left() -> bool:
            return await _waiting(rds) == []

        await _until(left, "the timed-out one out of the line")
        assert await _asked(http, fakes.gpubox, "#fake tokens=3 too late") == []
        hold.cancel()
    finally:
        await rds.aclose()


async def test_a_killed_worker_frees_its_slot(tight: Stack, http: httpx.AsyncClient) -> None:
    rds = aioredis.Redis.from_url(tight.env["HAIA_REDIS_URL"], decode_responses=True)
    try:
        hold = asyncio.create_task(
            _stream(http, tight, "fast", "#fake tokens=100 delay=0.1 dies holding it")
        )

        async def held() -> bool:
            return len(await _slot_holders(rds)) == 1

        await _until(held, "the slot taken")
        [holder] = list(await _slot_holders(rds))

        async def talking() -> bool:  # killed before its first token, it would run again
            return bool((await _get(http, tight, holder))["choices"][0]["message"]["content"])

        await _until(talking, "the first token")
        assert tight.worker is not None
        tight.worker.stop(signal.SIGKILL)
        tight.start_worker(wait=False)
        # The next generation gets the slot once the dead worker's heartbeat expires.
        response = await _chat(http, tight, "fast", "#fake tokens=3 after the death")
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
        frames = await hold
        assert any("error" in f.json() for f in frames if f.data and f.data != "[DONE]")
        stored = await dbcheck.wait_for_status(tight.database_url, holder, {"interrupted"})
        assert stored["status"] == "interrupted"
        assert holder not in await _slot_holders(rds)
    finally:
        await rds.aclose()


async def test_a_fallback_after_keepalives_still_names_the_model_that_answered(
    tight: Stack, fakes: Fakes, http: httpx.AsyncClient
) -> None:
    # The first model fails after 2 s of silence: the stream is open (pings, keep-alive 1 s)
    # before the fallback answers, and its chunks still name the fallback.
    text = "#fake tokens=3 first=2 midfail=0 only=phi4 (late)"
    frames = await _stream(http, tight, "twice", text)
    first_data = next(i for i, frame in enumerate(frames) if frame.data)
    assert any(frame.comment for frame in frames[:first_data])
    chunks = [frame.json() for frame in frames if frame.data and frame.data != "[DONE]"]
    assert {chunk["model"] for chunk in chunks} == {"gpubox:llama3.2"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert content_of(frames) == "Echo: (late)"  # gpubox ignores directives for other models
    assert len(await _asked(http, fakes.laptop, text)) == 1


async def test_responses_api_falls_back_and_names_the_model_that_answered(
    sdk: AsyncOpenAI,
) -> None:
    text = "#fake status=529 only=claude-fake (responses)"
    stream = await sdk.responses.create(model="careful", input=text, stream=True)
    events = [event async for event in stream]
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.model == "laptop:phi4"
    assert final.response.output_text == "Echo: (responses)"
    assert sum(1 for e in events if e.type == "response.in_progress") == 1
    again = await sdk.responses.retrieve(final.response.id)
    assert again.model == "laptop:phi4"
