"""Running the jobs a poll took: arq's rules and keys, in two scripts instead of two pipelines
per job.

arq starts a job with a MULTI/EXEC of its own (read the job, count the try, clear an abort
request) and finishes it with another (store the result, drop the job's keys, take it off the
queue): two round trips per generation, on top of the poll that took it. Here the poll's
script (`workers.main._CLAIM_JOBS`) does the first part for every job it takes, and
`JobEnds` does the second for every job that ended in the same event-loop tick, in one script.
What a job's keys hold, when it is retried, aborted or given up, and what its result says are
arq's, so `redis-cli`, arq's own tools and HAIA's sweepers see the same thing as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import SerializationError, deserialize_job_raw, serialize_result
from arq.utils import ms_to_datetime, timestamp_ms
from arq.worker import Function, JobExecutionFailed

log = logging.getLogger(__name__)

RETRY_KEY_TTL = 88400
"""Seconds a job's try count is kept (arq's value)."""


@dataclass(frozen=True)
class Claimed:
    """A job a poll took, with what arq reads when it starts one."""

    job_id: str
    score: int
    data: bytes | None
    """The serialized job; None when it expired."""
    job_try: int
    """This run's try, counted when it was taken (1 for the first run)."""
    aborted: bool
    """An abort was requested before it started."""


_FINISH_JOBS = """
-- KEYS[1]: the queue, KEYS[2]: the abort set, then four keys per job: its in-progress key, try
-- count, job and result. ARGV: four values per job: its id, '1' when it is finished ('0': it
-- goes back to the queue for another run), its serialized result ('' for none), and how long
-- the result is kept (ms). As arq's finish_job and finish_failed_job, for every job at once.
for i = 0, (#KEYS - 2) / 4 - 1 do
    local k = 3 + i * 4
    local a = 1 + i * 4
    redis.call('DEL', KEYS[k])
    if ARGV[a + 1] == '1' then
        if ARGV[a + 2] ~= '' then
            redis.call('SET', KEYS[k + 3], ARGV[a + 2], 'PX', ARGV[a + 3])
        end
        redis.call('DEL', KEYS[k + 1], KEYS[k + 2])
        redis.call('ZREM', KEYS[2], ARGV[a])
        redis.call('ZREM', KEYS[1], ARGV[a])
    end
end
return 1
"""


@dataclass
class _Ending:
    job_id: str
    finished: bool
    result: bytes | None
    sent: asyncio.Future[None]


class JobEnds:
    """Finishes the jobs that ended in one event-loop tick with one script."""

    def __init__(self, pool: ArqRedis, queue_name: str, *, keep_result_ms: int) -> None:
        self._pool = pool
        self._queue = queue_name
        self._keep_ms = keep_result_ms
        self._pending: list[_Ending] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._script: Any = None

    def finish(self, job_id: str, *, finished: bool, result: bytes | None) -> asyncio.Future[None]:
        """Done when the job's keys say so: finished (its result stored, the job gone), or
        not (back in the queue for its next run). Raises what Redis raised."""
        loop = asyncio.get_running_loop()
        if not self._pending:
            loop.call_soon(self._send_pending)
        ending = _Ending(job_id, finished, result, loop.create_future())
        self._pending.append(ending)
        return ending.sent

    def _send_pending(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Ending]) -> None:
        if self._script is None:
            self._script = self._pool.register_script(_FINISH_JOBS)
        keys = [self._queue, abort_jobs_ss]
        args: list[Any] = []
        for ending in batch:
            keys += [
                in_progress_key_prefix + ending.job_id,
                retry_key_prefix + ending.job_id,
                job_key_prefix + ending.job_id,
                result_key_prefix + ending.job_id,
            ]
            args += [ending.job_id, int(ending.finished), ending.result or b"", self._keep_ms]
        try:
            await self._script(keys=keys, args=args)
        except asyncio.CancelledError:
            _settle(batch, cancelled=True)
            raise
        except Exception as exc:  # noqa: BLE001 - Redis away: each job's run raises it
            _settle(batch, error=exc)
        else:
            _settle(batch)


def _settle(
    batch: list[_Ending], *, cancelled: bool = False, error: Exception | None = None
) -> None:
    for ending in batch:
        if ending.sent.done():
            continue
        if cancelled:
            ending.sent.cancel()
        elif error is not None:
            ending.sent.set_exception(error)
        else:
            ending.sent.set_result(None)


@dataclass
class JobRunner:
    """What running a job needs of its worker (arq's `Worker` attributes, by reference)."""

    functions: dict[str, Function]
    ctx: dict[str, Any]
    job_tasks: dict[str, asyncio.Task[Any]]
    aborting_tasks: set[str]
    pool: ArqRedis
    queue_name: str
    max_tries: int
    job_timeout_s: float
    keep_result_s: float
    serializer: Callable[[dict[str, Any]], bytes]
    deserializer: Callable[[bytes], dict[str, Any]]
    counted: Callable[[str], None]
    """Called with "complete", "failed" or "retried" (the worker's counters)."""
    ends: JobEnds

    async def run(self, job: Claimed) -> None:
        """Run `job` as arq runs one, then finish it."""
        start_ms = timestamp_ms()
        name, enqueued_ms = "<unknown>", 0
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = {}
        job_try = job.job_try

        def result_of(success: bool, result: Any) -> bytes | None:
            return serialize_result(
                name,
                args,
                kwargs,
                job_try,
                enqueued_ms,
                success,
                result,
                start_ms,
                timestamp_ms(),
                f"{job.job_id}:{name}",
                self.queue_name,
                job_id=job.job_id,
                serializer=self.serializer,
            )

        async def failed(exc: BaseException) -> None:
            self.counted("failed")
            await self._finish(job.job_id, finished=True, result=result_of(False, exc))

        if job.data is None:
            log.warning("job %s expired", job.job_id)
            return await failed(JobExecutionFailed("job expired"))
        try:
            name, args, kwargs, enqueued_try, enqueued_ms = deserialize_job_raw(
                job.data, deserializer=self.deserializer
            )
        except SerializationError as exc:
            log.exception("deserializing job %s failed", job.job_id)
            return await failed(exc)
        if job.aborted:
            log.info("job %s:%s aborted before it started", job.job_id, name)
            return await failed(asyncio.CancelledError())
        function = self.functions.get(name)
        if function is None:
            log.warning("job %s: function %r not found", job.job_id, name)
            return await failed(JobExecutionFailed(f"function {name!r} not found"))
        if enqueued_try and enqueued_try > job_try:
            job_try = enqueued_try
            await self.pool.setex(retry_key_prefix + job.job_id, RETRY_KEY_TTL, str(job_try))
        max_tries = self.max_tries if function.max_tries is None else function.max_tries
        if job_try > max_tries:
            log.warning("job %s:%s: max %d tries exceeded", job.job_id, name, max_tries)
            return await failed(JobExecutionFailed(f"max {max_tries} retries exceeded"))
        await self._execute(job, function, name, args, kwargs, job_try, enqueued_ms, result_of)

    async def _execute(
        self,
        job: Claimed,
        function: Function,
        name: str,
        args: Any,
        kwargs: Any,
        job_try: int,
        enqueued_ms: int,
        result_of: Callable[[bool, Any], bytes | None],
    ) -> None:
        ctx = {
            **self.ctx,
            "job_id": job.job_id,
            "job_try": job_try,
            "enqueue_time": ms_to_datetime(enqueued_ms),
            "score": job.score,
        }
        timeout = self.job_timeout_s if function.timeout_s is None else function.timeout_s
        log.debug("job %s:%s starts (try %d)", job.job_id, name, job_try)
        finished, result = False, None
        # The job runs in this task, not in one of its own as in arq: an abort cancels this
        # task (through `job_tasks`), which is all arq's own task was for. One task, future and
        # timer fewer per generation.
        task = asyncio.current_task()
        assert task is not None
        self.job_tasks[job.job_id] = task
        try:
            async with asyncio.timeout(timeout):
                # Inside the `try`, as arq does: a job whose arguments this function does not
                # take fails as a job, not as the worker.
                coroutine: Coroutine[Any, Any, Any] = function.coroutine(ctx, *args, **kwargs)
                value = await coroutine
        except asyncio.CancelledError as exc:
            task.uncancel()  # handled here: the job's end below still runs
            if job.job_id in self.aborting_tasks:  # aborted while it ran: finished
                self.aborting_tasks.discard(job.job_id)
                log.info("job %s:%s aborted", job.job_id, name)
                finished, result = True, result_of(False, exc)
                self.counted("failed")
            else:  # the worker stops: the job goes back to the queue for another run
                log.info("job %s:%s cancelled, will be run again", job.job_id, name)
                self.counted("retried")
        except Exception as exc:  # arq's rule: a job that raised is finished, as failed
            log.exception("job %s:%s failed: %s", job.job_id, name, type(exc).__name__)
            finished, result = True, result_of(False, exc)
            self.counted("failed")
        else:
            log.debug("job %s:%s done", job.job_id, name)
            finished, result = True, result_of(True, value)
            self.counted("complete")
        finally:
            self.job_tasks.pop(job.job_id, None)
        await self._finish(job.job_id, finished=finished, result=result)

    async def _finish(self, job_id: str, *, finished: bool, result: bytes | None) -> None:
        keep = result if self.keep_result_s > 0 else None
        await asyncio.shield(self.ends.finish(job_id, finished=finished, result=keep))
