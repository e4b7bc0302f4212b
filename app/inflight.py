"""The `haia:inflight` hash: one JSON entry per generation waiting for or held by a worker.

For `redis-cli` users (what is queued, what runs where, how far it got) and for the reaper,
which ends or reruns the generations of workers whose heartbeat expired.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, cast

from redis.asyncio import Redis

from app import keys
from app.db.models import Status


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Inflight:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    @staticmethod
    def queued_entry(*, conversation: str, model: str, request_id: str) -> dict[str, Any]:
        """Waiting in the queue for a worker (the worker's `running` replaces it); written
        with the job itself (`app.jobs.enqueue`)."""
        return {
            "conversation": conversation,
            "model": model,
            "status": Status.QUEUED.value,
            "queued_at": _now(),
            "worker": None,
            "request_id": request_id,
        }

    async def waiting(
        self,
        completion_id: str,
        *,
        conversation: str,
        model: str,
        request_id: str,
        worker: str,
        upstream: str,
    ) -> None:
        """Taken by a worker, waiting in line for a slot on `upstream` (its
        HAIA_UPSTREAM_<NAME>_MAX_CONCURRENT); the reaper reruns it if that worker dies."""
        entry = {
            "conversation": conversation,
            "model": model,
            "status": Status.QUEUED.value,
            "queued_at": _now(),
            "worker": worker,
            "waiting_for": upstream,
            "request_id": request_id,
        }
        await self._set(completion_id, entry)

    @staticmethod
    def running_entry(
        *, conversation: str, model: str, request_id: str, worker: str, attempt: int
    ) -> dict[str, Any]:
        return {
            "conversation": conversation,
            "model": model,
            "status": Status.IN_PROGRESS.value,
            "tokens": 0,
            "started_at": _now(),
            "worker": worker,
            "attempt": attempt,
            "request_id": request_id,
        }

    async def running(self, completion_id: str, entry: dict[str, Any]) -> None:
        await self._set(completion_id, entry)

    @staticmethod
    def progress_entry(entry: dict[str, Any], tokens: int) -> str:
        """`entry` after `tokens` deltas, as the publish batcher writes it with the deltas
        (`app.publish.Publisher.progress`)."""
        return json.dumps({**entry, "tokens": tokens})

    async def _set(self, completion_id: str, entry: dict[str, Any]) -> None:
        await cast(
            Awaitable[int], self._redis.hset(keys.INFLIGHT, completion_id, json.dumps(entry))
        )

    async def get(self, completion_id: str) -> dict[str, Any] | None:
        raw = await cast(Awaitable[bytes | None], self._redis.hget(keys.INFLIGHT, completion_id))
        return json.loads(raw) if raw else None

    async def remove(self, completion_id: str) -> bool:
        return bool(await cast(Awaitable[int], self._redis.hdel(keys.INFLIGHT, completion_id)))

    async def entries(self) -> dict[str, dict[str, Any]]:
        raw = await cast(Awaitable[dict[bytes, bytes]], self._redis.hgetall(keys.INFLIGHT))
        return {key.decode(): json.loads(value) for key, value in raw.items()}
