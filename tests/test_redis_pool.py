"""The quick-checkout pool, against a real Redis: it skips redis-py's per-command read probe
but must never hand out a connection with a stale reply, nor a dead one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from app.redis_pool import QuickCheckoutPool, quick_checkout
from tests.conftest import REDIS_BASE


@pytest.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    redis = quick_checkout(aioredis.Redis.from_url(f"{REDIS_BASE}/15"))
    assert isinstance(redis.connection_pool, QuickCheckoutPool)
    yield redis
    await redis.aclose()


async def test_a_cancelled_command_leaves_no_reply_for_the_next_one(
    client: aioredis.Redis,
) -> None:
    key, empty = f"pool-test:{uuid.uuid4().hex}", f"pool-test:{uuid.uuid4().hex}"
    await client.set(key, "the value", ex=30)
    # BLPOP on an empty list waits in Redis; cancelled while waiting, its reply (when the
    # timeout passes) must not be read as the reply of the next command.
    blocked = asyncio.ensure_future(cast(Awaitable[Any], client.blpop([empty], timeout=1)))
    await asyncio.sleep(0.05)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    await asyncio.sleep(1.2)  # the cancelled BLPOP's nil reply has arrived by now
    for _ in range(3):
        assert await client.get(key) == b"the value"


async def test_a_connection_the_server_closed_is_replaced(client: aioredis.Redis) -> None:
    key = f"pool-test:{uuid.uuid4().hex}"
    await client.set(key, "still here", ex=30)
    connection_id = await client.client_id()  # the pool's one connection
    admin = aioredis.Redis.from_url(f"{REDIS_BASE}/15")
    try:
        assert await admin.client_kill_filter(_id=connection_id) == 1
    finally:
        await admin.aclose()
    await asyncio.sleep(0.1)  # the close reaches the pooled connection's reader
    assert await client.get(key) == b"still here"


def test_only_redis_py_s_own_pool_is_switched() -> None:
    class Custom(aioredis.ConnectionPool):
        pass

    redis = aioredis.Redis(connection_pool=Custom())
    assert type(quick_checkout(redis).connection_pool) is Custom
