"""Open SSE streams per owner (HAIA_MAX_STREAMS_PER_OWNER), counted in Redis across web processes.

Each open stream holds a lease: a member of the sorted set `haia:streams:{owner}` scored with
the time (Redis's own clock) it expires. The web process that holds it renews its leases every
few seconds and removes a lease when its stream ends; a web process that dies stops renewing,
so its leases lapse after `lease` seconds and free their slots. Taking a slot first drops the
lapsed leases, then counts, then adds: one script, so two web processes cannot both take the
last slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis

from app import keys
from app.errors import RateLimited, Unavailable

log = logging.getLogger(__name__)

# KEYS: the owner's set. ARGV: lease id, limit, lease seconds. 1 when taken, else 0.
_TAKE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 1)
return 1
"""

# KEYS: owners' sets, one per lease. ARGV: lease seconds, then the lease ids in KEYS' order.
_RENEW = """
local now = redis.call('TIME')
local until_ = tonumber(now[1]) + tonumber(now[2]) / 1000000 + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', until_, ARGV[i + 1])
  redis.call('EXPIRE', key, math.ceil(tonumber(ARGV[1])) + 1)
end
return #KEYS
"""

RETRY_AFTER = 5.0
"""What a refused client is told to wait: streams end when their generation does."""


class StreamSlots:
    """This web process's leases on stream slots, renewed by one background task."""

    def __init__(self, redis: Redis, *, limit: int, lease: float) -> None:
        self._redis = redis
        self._limit = limit
        self._lease = lease
        self._held: dict[str, str] = {}  # lease id → owner key
        self._take = redis.register_script(_TAKE)
        self._renew = redis.register_script(_RENEW)
        self._task: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[Any]] = set()

    @property
    def enabled(self) -> bool:
        return self._limit > 0

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._renew_forever(), name="haia-stream-leases")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._releases):
            with contextlib.suppress(Exception):
                await task

    @asynccontextmanager
    async def hold(self, owner: str) -> AsyncIterator[None]:
        """A slot for one stream of `owner` while the block runs; a 429 when all are taken."""
        if not self.enabled:
            yield
            return
        lease_id = secrets.token_hex(8)
        key = keys.owner_streams(owner)
        try:
            taken = await self._take(keys=[key], args=[lease_id, self._limit, self._lease])
        except Exception as exc:
            raise Unavailable("HAIA cannot reach Redis right now; try again shortly.") from exc
        if not taken:
            raise RateLimited(
                f"You have {self._limit} streams open; HAIA allows {self._limit} at once "
                "(HAIA_MAX_STREAMS_PER_OWNER). Close one, or retry shortly.",
                retry_after=RETRY_AFTER,
            )
        self._held[lease_id] = key
        try:
            yield
        finally:
            # Not awaited here: the handler may be cancelled (the client left) and must not
            # wait on Redis to finish; the lease is dropped from renewal at once.
            self._held.pop(lease_id, None)
            task = asyncio.create_task(self._release(key, lease_id))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release(self, key: str, lease_id: str) -> None:
        try:
            await self._redis.zrem(key, lease_id)
        except Exception as exc:  # noqa: BLE001 - the lease lapses by itself
            log.warning("could not release a stream slot (%s)", type(exc).__name__)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 4)
            held = list(self._held.items())
            if not held:
                continue
            try:
                await self._renew(
                    keys=[key for _, key in held],
                    args=[self._lease, *(lease_id for lease_id, _ in held)],
                )
            except Exception as exc:  # noqa: BLE001 - Redis away: the next round renews
                log.warning("could not renew stream slots (%s)", type(exc).__name__)
