"""Publishing a generation's events: appended to the replay log, then published live."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, cast

from redis.asyncio import Redis

from app import keys
from app.events import Event, EventType


class Publisher:
    """Numbers events and sends each to the replay log and the live channel in one round trip."""

    def __init__(
        self, redis: Redis, completion_id: str, *, running_ttl: int, final_ttl: int
    ) -> None:
        self._redis = redis
        self._channel = keys.gen_channel(completion_id)
        self._log = keys.gen_log(completion_id)
        self._running_ttl = running_ttl
        self._final_ttl = final_ttl
        self.seq = 0

    async def resume_numbering(self) -> None:
        """Continue after what an earlier attempt of this job already logged."""
        self.seq = int(await cast(Awaitable[int], self._redis.llen(self._log)))

    async def emit(self, type_: EventType, **fields: Any) -> Event:
        self.seq += 1
        event = Event(seq=self.seq, type=type_, **fields)
        data = event.to_json()
        pipe = self._redis.pipeline(transaction=False)
        pipe.rpush(self._log, data)
        if event.is_terminal:
            pipe.expire(self._log, self._final_ttl)
        elif self.seq == 1:
            pipe.expire(self._log, self._running_ttl)
        pipe.publish(self._channel, data)
        await pipe.execute()
        return event
