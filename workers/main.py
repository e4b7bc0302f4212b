"""The arq worker: settings, start-up and shutdown, heartbeats, and a queue that wakes it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker
from pydantic_ai import Agent
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import keys
from app.config import Settings, load_settings
from app.db import close_database, open_database
from app.embedded_redis import ensure_redis
from app.generations import MAX_TRIES, reap_orphans
from app.logs import setup_logging
from app.prompts import HOMELAB_ASSISTANT_PROMPT
from workers.generate import generate
from workers.task import run_task

log = logging.getLogger(__name__)

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


class WakeableWorker(Worker):
    """An arq worker that starts a job as soon as the web says one was enqueued.

    arq polls its queue every `poll_delay`; that delay would be added to every request. The web
    publishes on `haia:queue:wake` after each enqueue, and this worker waits on that channel
    between polls, keeping the poll only as a fallback (delayed retries, missed wake-ups). It
    also rides out Redis restarts instead of exiting.
    """

    def __init__(self, *args: Any, wake_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, poll_delay=0, **kwargs)
        self._wake_timeout = wake_timeout
        self._woken = asyncio.Event()
        self._wake_task: asyncio.Task[None] | None = None

    async def _listen_for_wakeups(self) -> None:
        while True:
            try:
                pubsub = self.pool.pubsub()
                await pubsub.subscribe(keys.WAKE_CHANNEL)
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self._woken.set()
            except _REDIS_DOWN as exc:
                log.warning("wake-up channel lost (%s); retrying", type(exc).__name__)
                self._woken.set()
                await asyncio.sleep(1)

    async def _poll_iteration(self) -> None:
        if self._wake_task is None and not self.burst:
            self._wake_task = asyncio.create_task(self._listen_for_wakeups())
        self._woken.clear()
        try:
            await super()._poll_iteration()
        except _REDIS_DOWN as exc:
            log.warning("Redis unavailable (%s); retrying", type(exc).__name__)
            await asyncio.sleep(1)
            return
        if self.burst:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), self._wake_timeout)

    async def close(self) -> None:
        if self._wake_task is not None:
            self._wake_task.cancel()
        await super().close()


async def _heartbeat(ctx: dict[str, Any]) -> None:
    """Keep `haia:worker:{id}` alive, and end or rerun generations of workers that died."""
    settings: Settings = ctx["settings"]
    key = keys.worker_heartbeat(ctx["worker_id"])
    interval = settings.worker_dead_after / 4
    while True:
        try:
            await ctx["redis"].set(key, "1", px=int(settings.worker_dead_after * 1000))
            await reap_orphans(ctx["redis"], settings, max_tries=MAX_TRIES)
        except _REDIS_DOWN as exc:
            log.warning("heartbeat failed (%s)", type(exc).__name__)
        except Exception:
            log.exception("orphan check failed")
        await asyncio.sleep(interval)


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    await open_database(settings.database_url)
    ctx["agent"] = Agent(instructions=HOMELAB_ASSISTANT_PROMPT, output_type=str)
    ctx["task_agent"] = Agent(output_type=str)  # tasks bring their own instructions
    ctx["models"] = {}
    await ctx["redis"].set(
        keys.worker_heartbeat(ctx["worker_id"]), "1", px=int(settings.worker_dead_after * 1000)
    )
    ctx["heartbeat"] = asyncio.create_task(_heartbeat(ctx))


async def shutdown(ctx: dict[str, Any]) -> None:
    task: asyncio.Task[None] | None = ctx.get("heartbeat")
    if task is not None:
        task.cancel()
    with contextlib.suppress(Exception):
        await ctx["redis"].delete(keys.worker_heartbeat(ctx["worker_id"]))
    await close_database()


def create_worker(settings: Settings, *, redis_url: str, burst: bool = False) -> WakeableWorker:
    """The worker for `settings`; arq's ctx carries the settings to every job."""
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    return WakeableWorker(
        functions=[generate, run_task],
        queue_name=keys.QUEUE,
        redis_settings=RedisSettings.from_dsn(redis_url),
        on_startup=startup,
        on_shutdown=shutdown,
        ctx={"settings": settings, "worker_id": worker_id},
        max_jobs=settings.worker_max_jobs,
        job_timeout=settings.job_timeout,
        keep_result=60,
        max_tries=MAX_TRIES,
        allow_abort_jobs=True,
        health_check_interval=5,
        job_completion_wait=settings.shutdown_grace,
        burst=burst,
        wake_timeout=settings.worker_poll_delay,
    )


def main() -> None:
    settings = load_settings()
    setup_logging(settings, process="worker")
    redis_url = ensure_redis(settings)
    create_worker(settings, redis_url=redis_url).run()
