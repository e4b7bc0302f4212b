"""Script calls that share a write, against a real Redis: each call keeps its own result and
error, in order; a burst is one pipeline; Redis forgetting its scripts or going away is
survived or reported to every caller."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from app.script_calls import ScriptCalls, script_calls
from tests.conftest import REDIS_BASE

# Appends ARGV[1] to the list KEYS[1]; returns the list's length. ARGV[1] == 'fail': an error.
APPEND = """
if ARGV[1] == 'fail' then return redis.error_reply('asked to fail') end
return redis.call('RPUSH', KEYS[1], ARGV[1])
"""


@pytest.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis.from_url(f"{REDIS_BASE}/15")
    yield redis
    await redis.aclose()


class Counting(ScriptCalls):
    """Counts the pipelines sent."""

    sent = 0

    async def _pipeline(self, batch: list[Any]) -> list[Any]:
        self.sent += 1
        return await super()._pipeline(batch)


@pytest.fixture
async def counting(client: aioredis.Redis) -> AsyncIterator[tuple[Counting, str, AsyncScript]]:
    """Counted calls of APPEND on a fresh key; Redis knows the script already (else the first
    batch would be sent twice: once refused with NOSCRIPT, once after loading it)."""
    calls = Counting(client)
    key = f"script-calls:{uuid.uuid4().hex}"
    await client.script_load(APPEND)
    yield calls, key, calls.script(APPEND)
    await client.delete(key)


async def test_a_burst_is_one_pipeline_and_each_call_keeps_its_result(
    client: aioredis.Redis, counting: tuple[Counting, str, AsyncScript]
) -> None:
    calls, key, script = counting
    values = [str(i) if i != 5 else "fail" for i in range(50)]
    results = await asyncio.gather(
        *(calls.call(script, [key], [value]) for value in values), return_exceptions=True
    )
    assert calls.sent == 1
    assert isinstance(results[5], ResponseError) and "asked to fail" in str(results[5])
    lengths = [r for r in results if not isinstance(r, BaseException)]
    assert lengths == list(range(1, 50))  # applied in the order they were made
    assert await client.lrange(key, 0, -1) == [v.encode() for v in values if v != "fail"]  # type: ignore[misc]


async def test_the_calls_of_one_tick_share_a_batch_while_another_is_on_the_wire(
    counting: tuple[Counting, str, AsyncScript],
) -> None:
    calls, key, script = counting
    first = asyncio.ensure_future(calls.call(script, [key], ["a"]))
    await asyncio.sleep(0)  # the first batch is being sent
    await asyncio.sleep(0)
    later = [asyncio.ensure_future(calls.call(script, [key], [str(i)])) for i in range(10)]
    # Two batches, on two connections: which one Redis applies first is not fixed.
    assert sorted([await first, *await asyncio.gather(*later)]) == list(range(1, 12))
    assert calls.sent == 2


async def test_scripts_flushed_from_redis_are_loaded_again(client: aioredis.Redis) -> None:
    calls = ScriptCalls(client)
    key = f"script-calls:{uuid.uuid4().hex}"
    script = calls.script(APPEND)
    assert await calls.call(script, [key], ["a"]) == 1
    await client.script_flush()  # as after a Redis restart
    assert await asyncio.gather(*(calls.call(script, [key], [v]) for v in "bc")) == [2, 3]
    await client.delete(key)


async def test_redis_away_fails_every_call_of_the_batch() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    away = aioredis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    calls = ScriptCalls(away)
    script = calls.script(APPEND)
    results = await asyncio.gather(
        *(calls.call(script, ["k"], [str(i)]) for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, RedisConnectionError) for r in results)
    await away.aclose()


async def test_a_cancelled_caller_does_not_disturb_the_others(client: aioredis.Redis) -> None:
    calls = script_calls(client)
    assert script_calls(client) is calls  # one per client
    key = f"script-calls:{uuid.uuid4().hex}"
    script = calls.script(APPEND)
    gone = asyncio.ensure_future(calls.call(script, [key], ["gone"]))
    kept = asyncio.ensure_future(calls.call(script, [key], ["kept"]))
    await asyncio.sleep(0)  # both wait for their batch to go out
    gone.cancel()
    assert await kept == 1  # the call given up before its batch went out was not sent
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert await calls.call(script, [key], ["after"]) == 2
    assert await client.lrange(key, 0, -1) == [b"kept", b"after"]  # type: ignore[misc]
    await client.delete(key)


async def test_a_stalled_batch_does_not_hold_up_the_next_ones(client: aioredis.Redis) -> None:
    """A batch stuck on its connection (here: a script that blocks Redis's reply for a
    while is not possible, so a sender that never returns stands in for it) leaves the
    other senders free."""
    calls = Counting(client)
    stalled = asyncio.Event()
    real = calls._pipeline

    async def first_one_stalls(batch: list[Any]) -> list[Any]:
        if not stalled.is_set():
            stalled.set()
            await asyncio.sleep(3600)
        return await real(batch)

    calls._pipeline = first_one_stalls  # type: ignore[method-assign]
    key = f"script-calls:{uuid.uuid4().hex}"
    script = calls.script(APPEND)
    stuck = asyncio.ensure_future(calls.call(script, [key], ["stuck"]))
    await stalled.wait()
    assert await asyncio.wait_for(calls.call(script, [key], ["a"]), 5) == 1
    assert await asyncio.wait_for(calls.call(script, [key], ["b"]), 5) == 2
    stuck.cancel()
    await client.delete(key)


async def test_a_failed_reload_fails_only_the_calls_that_needed_it(
    client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = ScriptCalls(client)
    key = f"script-calls:{uuid.uuid4().hex}"
    known, forgotten = calls.script(APPEND), calls.script(APPEND + "-- another script\n")
    await client.script_flush()  # Redis forgets both (a restart)…
    await client.script_load(APPEND)  # …and the first one is loaded again by someone

    async def no_loading(source: str) -> str:
        raise RedisConnectionError("Redis went away again")

    monkeypatch.setattr(client, "script_load", no_loading)
    results = await asyncio.gather(
        calls.call(known, [key], ["ran"]),
        calls.call(forgotten, [key], ["x"]),
        return_exceptions=True,
    )
    assert results[0] == 1  # it ran: its result is delivered, not the reload's error
    assert isinstance(results[1], RedisConnectionError)
    await client.delete(key)
