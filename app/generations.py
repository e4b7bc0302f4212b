"""A generation's shared lifecycle: its replay log, the in-flight registry, and how it ends.

Used by the worker that runs a generation and by whichever process (web or worker) notices that
a worker died with generations in flight.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from arq.constants import abort_jobs_ss
from arq.utils import timestamp_ms
from redis.asyncio import Redis

from app import keys
from app.config import Settings
from app.db.models import Conversation, Message, Status
from app.errors import HaiaError, Unavailable
from app.events import Event
from app.metrics import record_generation
from app.publish import Publisher
from app.schemas import Usage
from app.turns import digest

log = logging.getLogger(__name__)

MAX_TRIES = 3
"""Runs of one generation arq may start (a worker death before the first token reruns it)."""


def interrupted_error() -> HaiaError:
    return Unavailable(
        "The worker running this generation stopped; the partial answer was kept.",
        code="generation_interrupted",
    )


def no_worker_error(settings: Settings) -> HaiaError:
    return Unavailable(
        f"No worker picked up the request within {settings.queue_timeout:g} s "
        "(HAIA_QUEUE_TIMEOUT); check that the `worker` process is running.",
        code="no_worker",
    )


def cancelled_detail() -> dict[str, Any]:
    return {
        "message": "The generation was cancelled.",
        "type": "cancelled",
        "param": None,
        "code": "cancelled",
    }


async def logged_events(redis: Redis, completion_id: str) -> list[Event]:
    raw = await cast(Awaitable[list[bytes]], redis.lrange(keys.gen_log(completion_id), 0, -1))
    return [Event.from_json(item) for item in raw]


def text_of(events: list[Event]) -> str:
    return "".join(event.text for event in events if event.type == "delta")


def publisher_for(redis: Redis, settings: Settings, completion_id: str) -> Publisher:
    return Publisher(
        redis,
        completion_id,
        running_ttl=settings.job_timeout + settings.replay_ttl,
        final_ttl=settings.replay_ttl,
    )


@dataclass
class Ending:
    """How a generation ended; stored on its message and announced as the `end` event."""

    status: Status
    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_at: datetime | None = None
    error: HaiaError | None = None
    error_detail: dict[str, Any] | None = None

    def usage(self) -> dict[str, int] | None:
        usage = Usage.of(self.prompt_tokens, self.completion_tokens)
        return usage.model_dump() if usage else None


async def finish(message: Message, publisher: Publisher, ending: Ending) -> None:
    """Store the assistant turn, then announce the end to every attached client."""
    detail = ending.error.body()["error"] if ending.error else ending.error_detail
    message.content = ending.text
    message.status = ending.status
    message.finish_reason = ending.finish_reason
    message.prompt_tokens = ending.prompt_tokens
    message.completion_tokens = ending.completion_tokens
    message.first_token_at = message.first_token_at or ending.first_token_at
    message.finished_at = datetime.now(UTC)
    message.error = detail
    if ending.text:
        previous = (
            await Message.filter(
                conversation_id=message.conversation_id,  # type: ignore[attr-defined]
                id__lt=message.id,
                prefix_hash__isnull=False,
            )
            .order_by("-id")
            .first()
        )
        message.prefix_hash = digest(
            previous.prefix_hash if previous else None, "assistant", ending.text
        )
    await message.save()
    await Conversation.filter(id=message.conversation_id).update(  # type: ignore[attr-defined]
        updated_at=message.finished_at
    )
    extra: dict[str, Any] = {}
    if ending.error is not None:
        extra["http_status"] = ending.error.status
        if ending.error.retry_after is not None:
            extra["retry_after"] = ending.error.retry_after
    await publisher.emit(
        "end",
        status=ending.status.value,
        finish_reason=ending.finish_reason,
        usage=ending.usage(),
        error=detail,
        extra=extra,
    )
    first, created = message.first_token_at, message.created_at
    await record_generation(
        publisher._redis,
        model=message.model or "unknown",
        status=ending.status.value,
        ttft_seconds=(first - created).total_seconds() if first and created else None,
        prompt_tokens=ending.prompt_tokens,
        completion_tokens=ending.completion_tokens,
    )


async def end_without_worker(
    redis: Redis,
    settings: Settings,
    completion_id: str,
    *,
    status: Status,
    only_if: tuple[Status, ...] = (Status.QUEUED, Status.IN_PROGRESS),
    error: HaiaError | None = None,
) -> bool:
    """End a generation no worker is running (cancelled while queued, or orphaned).

    Claims it in the database first (only while its status is one of `only_if`), then keeps
    whatever text the log holds. Returns False when someone else ended or runs it.
    """
    claimed = await Message.filter(completion_id=completion_id, status__in=only_if).update(
        status=status
    )
    message = await Message.get_or_none(completion_id=completion_id)
    if not claimed or message is None:
        return False
    events = await logged_events(redis, completion_id)
    publisher = publisher_for(redis, settings, completion_id)
    publisher.seq = events[-1].seq if events else 0
    has_text = any(e.type == "delta" for e in events)
    await finish(
        message,
        publisher,
        Ending(
            status=status,
            text=text_of(events),
            finish_reason="stop" if status == Status.CANCELLED else None,
            error=error or (interrupted_error() if status == Status.INTERRUPTED else None),
            error_detail=cancelled_detail() if status == Status.CANCELLED else None,
            first_token_at=message.started_at if has_text else None,
        ),
    )
    return True


async def claim_for_worker(completion_id: str) -> bool:
    """Mark a queued (or handed-back) generation as running; False if it already ended."""
    claimed = await Message.filter(
        completion_id=completion_id, status__in=[Status.QUEUED, Status.IN_PROGRESS]
    ).update(status=Status.IN_PROGRESS, started_at=datetime.now(UTC))
    return bool(claimed)


class Inflight:
    """The `haia:inflight` hash: one JSON entry per running generation, for redis-cli users
    and for noticing generations whose worker died."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def add(self, message: Message, *, worker_id: str) -> None:
        entry = {
            "conversation": message.conversation_id,  # type: ignore[attr-defined]
            "model": message.model,
            "status": Status.IN_PROGRESS.value,
            "tokens": 0,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "worker": worker_id,
            "request_id": message.request_id,
        }
        await self._set(str(message.completion_id), entry)

    async def progress(self, completion_id: str, entry: dict[str, Any], tokens: int) -> None:
        await self._set(completion_id, {**entry, "tokens": tokens})

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


async def reap_orphans(redis: Redis, settings: Settings, *, max_tries: int) -> list[str]:
    """Handle generations whose worker stopped sending heartbeats.

    One that had sent no text yet is run again at once by another worker (arq's in-progress
    marker is dropped); one that had is ended as `interrupted`, keeping its partial text.
    Safe to run from many processes: removing the in-flight entry is the claim.
    """
    inflight = Inflight(redis)
    handled = []
    for completion_id, entry in (await inflight.entries()).items():
        if await redis.exists(keys.worker_heartbeat(str(entry.get("worker")))):
            continue
        if not await inflight.remove(completion_id):
            continue  # another process claimed it
        handled.append(completion_id)
        events = await logged_events(redis, completion_id)
        tries = int(await redis.get(keys.arq_retry(completion_id)) or 0)
        if any(e.type == "delta" for e in events) or tries >= max_tries:
            log.warning("generation %s lost its worker; ending it as interrupted", completion_id)
            await end_without_worker(redis, settings, completion_id, status=Status.INTERRUPTED)
            await redis.zrem(keys.QUEUE, completion_id)
            await redis.delete(*keys.arq_job_keys(completion_id))
        else:
            log.warning(
                "generation %s lost its worker before its first token; rerunning", completion_id
            )
            await redis.delete(keys.arq_in_progress(completion_id))
            await redis.publish(keys.WAKE_CHANNEL, completion_id)
    return handled


async def abort_job(redis: Redis, completion_id: str) -> None:
    """Ask arq to cancel the job wherever it runs (workers check on their next poll)."""
    await redis.zadd(abort_jobs_ss, {completion_id: timestamp_ms()})
    await redis.publish(keys.WAKE_CHANNEL, completion_id)
