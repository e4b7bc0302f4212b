"""The arq worker: start-up and shutdown, liveness, admission, and a queue that wakes it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from signal import Signals
from typing import Any

import uvloop
from arq.connections import RedisSettings
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    retry_key_prefix,
)
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import jobs, keys
from app.config import Settings, load_settings
from app.db import close_database, open_database
from app.embedded_redis import ensure_redis
from app.generations import MAX_TRIES, SWEEP_EVERY, Sweeper, reap_orphans
from app.logs import setup_logging
from app.preflight import require_redis
from app.publish import Batcher
from app.redis_pool import quick_checkout
from workers.generate import generate
from workers.heartbeat import Heartbeat
from workers.jobs_run import RETRY_KEY_TTL, Claimed, JobEnds, JobRunner
from workers.openai_wire import OpenAIWire
from workers.state import WorkerState, state
from workers.task import run_task

log = logging.getLogger(__name__)

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)

_CLAIM_JOBS = """
-- KEYS[1]: the queue, KEYS[2]: arq's abort set; then three keys per job: its in-progress key,
-- the job and its try count. ARGV[1]: now (ms), ARGV[2]: the in-progress key's lifetime (ms),
-- ARGV[3]: how many jobs to take at most, ARGV[4]: the try count's lifetime (s), then each
-- job's id. Takes, in queue order, every job that no worker runs and whose time has come, up
-- to the limit (jobs other workers run are passed over, not counted), and starts each as arq
-- starts one: reads it, counts the try, clears an abort request made before it started.
-- Returns five values per job: id, score, the job (false: expired), try, aborted (1/0).
local taken = {}
local room = tonumber(ARGV[3])
for i = 0, (#KEYS - 2) / 3 - 1 do
    if #taken >= 5 * room then break end
    local progress, job, tries, id = KEYS[3 + i * 3], KEYS[4 + i * 3], KEYS[5 + i * 3], ARGV[5 + i]
    if redis.call('EXISTS', progress) == 0 then
        local score = redis.call('ZSCORE', KEYS[1], id)
        if score and tonumber(score) <= tonumber(ARGV[1]) then
            redis.call('PSETEX', progress, ARGV[2], '1')
            local try = redis.call('INCR', tries)
            redis.call('EXPIRE', tries, ARGV[4])
            taken[#taken + 1] = id
            taken[#taken + 1] = score
            taken[#taken + 1] = redis.call('GET', job)
            taken[#taken + 1] = try
            taken[#taken + 1] = redis.call('ZREM', KEYS[2], id)
        end
    end
end
return taken
"""

POLL_COALESCE = 0.002
"""Seconds a poll waits after the previous one, so that the jobs enqueued meanwhile are claimed
by one script (a poll right after a quiet spell goes at once)."""
ABORT_CHECK_EVERY = 0.05
"""Seconds between two reads of arq's abort set (it was one round trip per poll)."""

ADMISSION_LAG = 0.1
"""Seconds of event-loop lag above which a worker stops taking new generations: the ones it
runs would slow down, and the queue (or another worker) serves the rest at full speed."""


class WakeableWorker(Worker):
    """An arq worker that starts a job as soon as the web says one was enqueued, and takes
    only as many as it can serve at full speed.

    arq polls its queue every `poll_delay`; that delay would be added to every request. The web
    publishes on `haia:queue:wake` after each enqueue, and this worker waits on that channel
    between polls, keeping the poll only as a fallback (delayed retries, missed wake-ups). It
    also rides out Redis restarts instead of exiting, and pauses taking jobs while its event
    loop lags (admission: the rest wait in the queue, in order, for this or another worker).
    """

    def __init__(self, *args: Any, wake_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, poll_delay=0, **kwargs)
        self._claim: Any = None
        self._runner: JobRunner | None = None
        self._wake_timeout = wake_timeout
        self._woken = asyncio.Event()
        self._announced: list[bytes] = []
        self._polled_at = 0.0
        self._abort_check_at = 0.0
        self._behind = True
        """Due jobs may wait that no wake-up names (a fresh start, a full worker, paused
        admission, a delayed retry): the next poll scans the queue."""
        self._wake_task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self.lag = 0.0
        self._draining = False

    async def _listen_for_wakeups(self) -> None:
        while True:
            try:
                pubsub = self.pool.pubsub()
                await pubsub.subscribe(keys.WAKE_CHANNEL)
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self._announced.append(message["data"])
                        self._woken.set()
            except _REDIS_DOWN as exc:
                log.warning("wake-up channel lost (%s); retrying", type(exc).__name__)
                self._behind = True
                self._woken.set()
                await asyncio.sleep(1)

    async def _measure_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.05)
            overshoot = loop.time() - before - 0.05
            self.lag = 0.7 * self.lag + 0.3 * max(overshoot, 0.0)

    async def _poll_iteration(self) -> None:
        if self.burst:
            await super()._poll_iteration()
            return
        if self._wake_task is None:
            self._wake_task = asyncio.create_task(self._listen_for_wakeups())
            self._lag_task = asyncio.create_task(self._measure_lag())
        loop = asyncio.get_running_loop()
        wait = self._polled_at + POLL_COALESCE - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        self._polled_at = loop.time()
        self._woken.clear()
        announced, self._announced = self._announced, []
        if not self._draining:
            self.allow_pick_jobs = self.lag < ADMISSION_LAG or not self.tasks
        try:
            await self._take(announced)
            if self.allow_abort_jobs and self._polled_at >= self._abort_check_at:
                self._abort_check_at = self._polled_at + ABORT_CHECK_EVERY
                await self._cancel_aborted_jobs()
            for job_id, task in list(self.tasks.items()):
                if task.done():
                    del self.tasks[job_id]
                    task.result()  # what went wrong in arq's run_job is raised here
            await self.heart_beat()
        except _REDIS_DOWN as exc:
            log.warning("Redis unavailable (%s); retrying", type(exc).__name__)
            self._behind = True
            await asyncio.sleep(1)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), self._wake_timeout)
        if not self._woken.is_set():
            self._behind = True  # a silent interval: the fallback poll scans the queue

    async def _take(self, announced: list[bytes]) -> None:
        """Take due jobs: those the wake-ups announced, or, when jobs may wait that none
        announced, the whole queue in order. Announced ids cost what is new; a scan reads
        every queued id, the running ones included (arq removes a job when it finishes)."""
        if not self.allow_pick_jobs or self.job_counter >= self.max_jobs:
            self._behind = self._behind or bool(announced)
            return
        if announced and not self._behind:
            self._behind = not await self.start_jobs(announced)
            return
        job_ids = await self.pool.zrangebyscore(
            self.queue_name,
            min=float("-inf"),
            max=timestamp_ms(),
            start=0,
            num=self.queue_read_limit,
        )
        self._behind = not await self.start_jobs(job_ids) or len(job_ids) >= self.queue_read_limit

    async def start_jobs(self, job_ids: list[bytes]) -> bool:  # type: ignore[override]
        """Take the jobs of one poll in one atomic script, not arq's four round trips each
        (WATCH, EXISTS, ZSCORE, then MULTI/PSETEX/EXEC, job after job): at a few hundred
        queued generations those round trips were most of the worker's Redis time and added
        their latency, in series, to every generation's first token. Same rule as arq's: a
        job is taken when no worker holds its in-progress key and its score is due. False
        when this worker's room ran out first (due jobs may be left for a later poll)."""
        room = self.max_jobs - self.job_counter
        # The queue lists running jobs too (arq removes a job when it finishes): this
        # worker's own are skipped here, so a poll costs what is new, not what runs. Jobs
        # other workers run are skipped by the script, and do not count against `room`.
        fresh = (job_id.decode() for job_id in job_ids)
        ids = [job_id for job_id in fresh if not self._runs(job_id)]
        if not ids:
            return True
        if room <= 0:
            return False
        if self._claim is None:
            self._claim = self.pool.register_script(_CLAIM_JOBS)
        job_keys = (
            key
            for job_id in ids
            for key in (
                in_progress_key_prefix + job_id,
                job_key_prefix + job_id,
                retry_key_prefix + job_id,
            )
        )
        taken = await self._claim(
            keys=[self.queue_name, abort_jobs_ss, *job_keys],
            args=[
                timestamp_ms(),
                int(self.in_progress_timeout_s * 1000),
                room,
                RETRY_KEY_TTL,
                *ids,
            ],
        )
        for at in range(0, len(taken), 5):
            raw_id, raw_score, data, job_try, aborted = taken[at : at + 5]
            await self.sem.acquire()  # free: `room` counted the jobs this worker runs
            self.job_counter += 1
            job = Claimed(
                job_id=raw_id.decode(),
                score=int(float(raw_score)),
                data=data,
                job_try=int(job_try),
                aborted=bool(aborted),
            )
            task = self.loop.create_task(self.run_claimed(job))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job.job_id] = task
        return len(taken) < 5 * room  # the room ran out: due jobs may be left

    async def run_claimed(self, job: Claimed) -> None:
        """Run a job the poll took (`workers.jobs_run`: arq's rules, fewer round trips)."""
        if self._runner is None:
            self._runner = JobRunner(
                functions=self.functions,  # type: ignore[arg-type] # no cron jobs here
                ctx=self.ctx,
                job_tasks=self.job_tasks,
                aborting_tasks=self.aborting_tasks,
                pool=self.pool,
                queue_name=self.queue_name,
                max_tries=self.max_tries,
                job_timeout_s=self.job_timeout_s,
                keep_result_s=self.keep_result_s,
                serializer=jobs.serialize,
                deserializer=jobs.deserialize,
                counted=self._count,
                ends=JobEnds(
                    self.pool, self.queue_name, keep_result_ms=int(self.keep_result_s * 1000)
                ),
            )
        await self._runner.run(job)

    def _count(self, outcome: str) -> None:
        if outcome == "complete":
            self.jobs_complete += 1
        elif outcome == "failed":
            self.jobs_failed += 1
        else:
            self.jobs_retried += 1

    def _runs(self, job_id: str) -> bool:
        task = self.tasks.get(job_id)
        return task is not None and not task.done()

    def _stopping(self) -> None:
        self._draining = True
        self.allow_pick_jobs = False
        haia = self.ctx.get("haia")
        if isinstance(haia, WorkerState):
            haia.shutting_down = True

    def handle_sig(self, signum: Signals) -> None:
        self._stopping()
        super().handle_sig(signum)

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        self._stopping()
        super().handle_sig_wait_for_completion(signum)

    async def close(self) -> None:
        for task in (self._wake_task, self._lag_task):
            if task is not None:
                task.cancel()
        await super().close()


async def _maintain(st: WorkerState) -> None:
    """End or rerun the generations of workers that died; end rows no job will end."""
    sweeper = Sweeper(st.redis, st.settings)
    interval = st.settings.worker_dead_after / 4
    loop = asyncio.get_running_loop()
    next_sweep = loop.time() + SWEEP_EVERY
    while True:
        await asyncio.sleep(interval)
        try:
            await reap_orphans(st.redis, st.settings, max_tries=MAX_TRIES)
            if loop.time() >= next_sweep:
                next_sweep = loop.time() + SWEEP_EVERY
                await sweeper.sweep()
        except Exception as exc:  # noqa: BLE001 - Redis or the database away: next round
            log.warning("orphan check failed (%s)", type(exc).__name__)


async def startup(ctx: dict[str, Any]) -> None:
    st = state(ctx)
    st.redis = quick_checkout(ctx["redis"])  # arq's pool, shared by every job
    await open_database(st.settings.database_url)
    st.batcher = Batcher(st.redis)
    st.batcher.start()
    st.wire = OpenAIWire(timeout=st.settings.llm_timeout)
    st.heartbeat = Heartbeat(
        st.redis_url, keys.worker_heartbeat(st.worker_id), ttl=st.settings.worker_dead_after
    )
    st.heartbeat.beat()
    st.heartbeat.start()
    ctx["maintenance"] = asyncio.create_task(_maintain(st), name="haia-maintenance")


async def shutdown(ctx: dict[str, Any]) -> None:
    st = state(ctx)
    task: asyncio.Task[None] | None = ctx.get("maintenance")
    if task is not None:
        task.cancel()
    await st.batcher.stop()
    await st.wire.aclose()
    await asyncio.to_thread(st.heartbeat.stop)
    await close_database()


def create_worker(settings: Settings, *, redis_url: str, burst: bool = False) -> WakeableWorker:
    """The worker for `settings`; every job reaches its `WorkerState` through `ctx`."""
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    return WakeableWorker(
        functions=[generate, run_task],
        queue_name=keys.QUEUE,
        redis_settings=RedisSettings.from_dsn(redis_url),
        on_startup=startup,
        on_shutdown=shutdown,
        ctx={"haia": WorkerState(settings=settings, worker_id=worker_id, redis_url=redis_url)},
        max_jobs=settings.worker_max_jobs,
        # HAIA ends a generation at HAIA_JOB_TIMEOUT itself (keeping its text); arq's own
        # timeout is only the backstop.
        job_timeout=settings.job_timeout + 30,
        keep_result=60,
        max_tries=MAX_TRIES,
        allow_abort_jobs=True,
        health_check_interval=5,
        job_completion_wait=settings.shutdown_grace,
        burst=burst,
        wake_timeout=settings.worker_poll_delay,
        job_serializer=jobs.serialize,
        job_deserializer=jobs.deserialize,
    )


def main() -> None:
    # uvloop, as the web runs on (Sanic picks it): its C event loop and transports halve the
    # cost of every socket read and write on the per-token path.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    settings = load_settings()
    setup_logging(settings, process="worker")
    redis_url = ensure_redis(settings)
    require_redis(redis_url)
    create_worker(settings, redis_url=redis_url).run()
