"""The arq worker: settings, start-up and shutdown, and a queue that wakes it without polling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker
from pydantic_ai import Agent

from app import keys
from app.config import Settings, load_settings
from app.db import close_database, open_database
from app.embedded_redis import ensure_redis
from app.logs import setup_logging
from app.prompts import HOMELAB_ASSISTANT_PROMPT
from workers.generate import generate

log = logging.getLogger(__name__)


class WakeableWorker(Worker):
    """An arq worker that starts a job as soon as the web says one was enqueued.

    arq polls its queue every `poll_delay`; that delay would be added to every request. The web
    publishes on `haia:queue:wake` after each enqueue, and this worker waits on that channel
    between polls, keeping the poll only as a fallback (delayed retries, missed wake-ups).
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
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: polling still works; retry
                log.warning("wake-up channel lost (%s); retrying", type(exc).__name__)
                self._woken.set()
                await asyncio.sleep(1)

    async def _poll_iteration(self) -> None:
        if self._wake_task is None and not self.burst:
            self._wake_task = asyncio.create_task(self._listen_for_wakeups())
        self._woken.clear()
        await super()._poll_iteration()
        if self.burst:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), self._wake_timeout)

    async def close(self) -> None:
        if self._wake_task is not None:
            self._wake_task.cancel()
        await super().close()


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    await open_database(settings.database_url)
    ctx["agent"] = Agent(instructions=HOMELAB_ASSISTANT_PROMPT, output_type=str)
    ctx["models"] = {}


async def shutdown(ctx: dict[str, Any]) -> None:
    await close_database()


def create_worker(settings: Settings, *, redis_url: str, burst: bool = False) -> WakeableWorker:
    """The worker for `settings`; arq's ctx carries the settings to every job."""
    return WakeableWorker(
        functions=[generate],
        queue_name=keys.QUEUE,
        redis_settings=RedisSettings.from_dsn(redis_url),
        on_startup=startup,
        on_shutdown=shutdown,
        ctx={"settings": settings},
        max_jobs=settings.worker_max_jobs,
        job_timeout=settings.job_timeout,
        keep_result=60,
        max_tries=3,
        allow_abort_jobs=True,
        health_check_interval=5,
        burst=burst,
        wake_timeout=settings.worker_poll_delay,
    )


def main() -> None:
    settings = load_settings()
    setup_logging(settings, process="worker")
    redis_url = ensure_redis(settings)
    create_worker(settings, redis_url=redis_url).run()
