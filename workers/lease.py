"""A generation's slot on a limited upstream (`app.slots`), taken and given back by its job.

Waiting is a sleep between attempts, so it costs the worker's event loop nothing and its
admission (which watches event-loop lag) keeps taking jobs for other upstreams meanwhile.
A waiting generation stops waiting as soon as it ends elsewhere (cancelled, or timed out in
the queue by the web) and gives its place back when its job is cancelled.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from app import keys
from app.slots import Slots
from app.upstreams import Upstream

POLL = 0.2
"""Seconds between attempts to take a slot."""


class Lease:
    """At most one slot at a time, for one generation."""

    def __init__(self, redis: Redis, *, completion_id: str, worker: str, arrival_ms: int) -> None:
        self._redis = redis
        self._completion_id = completion_id
        self._worker = worker
        self._arrival_ms = arrival_ms
        self.held: str | None = None

    @functools.cached_property
    def _slots(self) -> Slots:
        # Only a limited upstream needs it: most generations never do (it registers a script).
        return Slots(self._redis)

    async def enter(
        self, upstream: Upstream, *, on_wait: Callable[[Upstream], Awaitable[None]] | None = None
    ) -> bool:
        """Hold a slot on `upstream` (none needed without a limit), waiting in line for it.

        Gives back any slot held on another upstream first. False when the generation ended
        elsewhere while it waited.
        """
        if self.held == upstream.name:
            return True
        await self.leave()
        if not upstream.max_concurrent:
            return True
        try:
            waited = False
            while not await self._take(upstream):
                if not waited and on_wait is not None:
                    await on_wait(upstream)
                waited = True
                if await self._ended():
                    await self._slots.release([upstream.name], self._completion_id)
                    return False
                await asyncio.sleep(POLL)
        except BaseException:
            await asyncio.shield(self._slots.release([upstream.name], self._completion_id))
            raise
        self.held = upstream.name
        return True

    async def _take(self, upstream: Upstream) -> bool:
        return await self._slots.take(
            upstream.name,
            completion_id=self._completion_id,
            worker=self._worker,
            limit=upstream.max_concurrent,
            arrival_ms=self._arrival_ms,
        )

    async def _ended(self) -> bool:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(keys.gen_fence(self._completion_id))
        pipe.exists(keys.gen_cancel(self._completion_id))
        fence, cancelled = await pipe.execute()
        return fence == b"end" or bool(cancelled)

    async def leave(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            await self._slots.release([held], self._completion_id)
