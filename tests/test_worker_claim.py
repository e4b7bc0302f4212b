"""Which queued jobs a worker's poll takes (`WakeableWorker.start_jobs`, one Lua script), and
how a taken job runs and finishes (`workers.jobs_run`, arq's rules and keys).

arq's queue lists a job until it finishes, so a poll sees the jobs every worker runs. Those of
other workers must be passed over without using this worker's free slots: a new job behind
them is taken as long as this worker has room.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.worker import func

from app import jobs, keys
from tests.conftest import REDIS_BASE
from workers.jobs_run import Claimed, JobEnds
from workers.main import ADMISSION_LAG, WakeableWorker


@pytest.fixture
async def pool() -> AsyncIterator[ArqRedis]:
    client = ArqRedis.from_url(f"{REDIS_BASE}/15")
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


async def noop(ctx: dict[str, Any], job_id: str) -> None:
    """Never run: the test records what would start."""


def worker(pool: ArqRedis, max_jobs: int, started: list[str]) -> WakeableWorker:
    found = WakeableWorker(
        functions=[noop],
        queue_name=keys.QUEUE,
        redis_pool=pool,
        max_jobs=max_jobs,
        wake_timeout=1.0,
        burst=True,
    )

    async def run_claimed(job: Claimed) -> None:
        started.append(job.job_id)

    found.run_claimed = run_claimed  # type: ignore[method-assign]
    return found


async def queued(pool: ArqRedis) -> list[bytes]:
    return list(await pool.zrangebyscore(keys.QUEUE, min="-inf", max="+inf"))


async def test_jobs_other_workers_run_do_not_use_this_workers_room(pool: ArqRedis) -> None:
    for job_id in ("elsewhere-1", "elsewhere-2", "new-1", "new-2"):
        assert await jobs.enqueue(pool, "noop", job_id)
    for job_id in ("elsewhere-1", "elsewhere-2"):  # another worker runs these
        await pool.psetex(in_progress_key_prefix + job_id, 60_000, b"1")
    started: list[str] = []
    one_slot = worker(pool, max_jobs=1, started=started)
    await one_slot.start_jobs(await queued(pool))
    for task in list(one_slot.tasks.values()):
        await task
    assert started == ["new-1"]  # in queue order, up to its one free slot
    assert await pool.exists(in_progress_key_prefix + "new-1")
    assert not await pool.exists(in_progress_key_prefix + "new-2")  # left for the next poll


async def test_a_job_due_later_waits(pool: ArqRedis) -> None:
    assert await jobs.enqueue(pool, "noop", "now")
    await pool.zadd(keys.QUEUE, {"later": 2**52})  # a retry deferred far into the future
    started: list[str] = []
    room = worker(pool, max_jobs=10, started=started)
    await room.start_jobs(await queued(pool))
    for task in list(room.tasks.values()):
        await task
    assert started == ["now"]


async def test_a_wake_up_takes_the_jobs_it_names_and_a_full_worker_scans_later(
    pool: ArqRedis,
) -> None:
    """Woken with job ids, a poll claims those ids and reads nothing else of the queue. When
    its room ran out (or it was paused), due jobs may wait that no wake-up will name again:
    its next poll scans the whole queue, in order."""
    for job_id in ("unannounced", "announced-1", "announced-2"):
        assert await jobs.enqueue(pool, "noop", job_id)
    # Queue order is by score (enqueue time in ms), then by id: make the order explicit.
    await pool.zadd(keys.QUEUE, {"unannounced": 1, "announced-1": 2, "announced-2": 3})
    started: list[str] = []
    one_slot = worker(pool, max_jobs=1, started=started)
    one_slot.burst = False
    one_slot._behind = False  # caught up: a wake-up's ids are all there is to take
    await one_slot._take([b"announced-1", b"announced-2"])
    for task in list(one_slot.tasks.values()):
        await task
    assert started == ["announced-1"]  # not the older job nobody announced
    assert one_slot._behind  # "announced-2" is due and was not taken: scan next time
    one_slot.job_counter = 0  # "announced-1" finished
    await one_slot._take([])
    for task in list(one_slot.tasks.values()):
        await task
    assert started == ["announced-1", "unannounced"]  # the scan, in queue order
    assert one_slot._behind  # the room ran out again


def running_worker(pool: ArqRedis, *functions: Any, job_timeout: float = 10) -> WakeableWorker:
    return WakeableWorker(
        functions=list(functions),
        queue_name=keys.QUEUE,
        redis_pool=pool,
        max_jobs=10,
        wake_timeout=1.0,
        burst=True,
        job_timeout=job_timeout,
        keep_result=60,
        max_tries=2,
        job_serializer=jobs.serialize,
        job_deserializer=jobs.deserialize,
    )


async def run_queue(found: WakeableWorker, pool: ArqRedis) -> None:
    await found.start_jobs(await queued(pool))
    for task in list(found.tasks.values()):
        await task


def job_keys(job_id: str) -> list[str]:
    return [
        prefix + job_id for prefix in (in_progress_key_prefix, job_key_prefix, retry_key_prefix)
    ]


async def answer(ctx: dict[str, Any], job_id: str, *, word: str) -> str:
    return f"{word} from try {ctx['job_try']}"


async def test_a_finished_job_leaves_its_result_and_nothing_else(pool: ArqRedis) -> None:
    assert await jobs.enqueue(pool, "answer", "done-1", word="hello")
    found = running_worker(pool, answer)
    await run_queue(found, pool)
    result = jobs.deserialize(await pool.get(result_key_prefix + "done-1"))
    assert (result["s"], result["r"], result["t"], result["f"]) == (
        True,
        "hello from try 1",
        1,
        "answer",
    )
    assert 0 < await pool.pttl(result_key_prefix + "done-1") <= 60_000
    assert not await pool.exists(*job_keys("done-1"))
    assert await queued(pool) == []
    assert found.jobs_complete == 1


async def fails(ctx: dict[str, Any], job_id: str) -> None:
    raise ValueError("no")


async def test_a_failing_job_is_finished_as_failed(pool: ArqRedis) -> None:
    assert await jobs.enqueue(pool, "fails", "failed-1")
    found = running_worker(pool, fails)
    await run_queue(found, pool)
    result = jobs.deserialize(await pool.get(result_key_prefix + "failed-1"))
    assert (result["s"], result["r"]) == (False, "ValueError: no")
    assert await queued(pool) == [] and found.jobs_failed == 1


async def test_a_job_over_its_tries_is_given_up_without_running(pool: ArqRedis) -> None:
    assert await jobs.enqueue(pool, "answer", "tired-1", word="x")
    await pool.set(retry_key_prefix + "tired-1", 2)  # two runs started already (max_tries=2)
    found = running_worker(pool, answer)
    await run_queue(found, pool)
    result = jobs.deserialize(await pool.get(result_key_prefix + "tired-1"))
    assert result["s"] is False and "max 2 retries exceeded" in result["r"]
    assert await queued(pool) == []


async def test_an_abort_before_the_start_finishes_it_unrun(pool: ArqRedis) -> None:
    assert await jobs.enqueue(pool, "answer", "aborted-1", word="x")
    await pool.zadd(abort_jobs_ss, {"aborted-1": 1})
    found = running_worker(pool, answer)
    await run_queue(found, pool)
    result = jobs.deserialize(await pool.get(result_key_prefix + "aborted-1"))
    assert result["s"] is False and result["r"].startswith("CancelledError")
    assert not await pool.zscore(abort_jobs_ss, "aborted-1")
    assert await queued(pool) == []


async def test_an_expired_job_is_finished_as_failed(pool: ArqRedis) -> None:
    await pool.zadd(keys.QUEUE, {"gone-1": 1})  # queued, but its job key expired
    found = running_worker(pool, answer)
    await run_queue(found, pool)
    result = jobs.deserialize(await pool.get(result_key_prefix + "gone-1"))
    assert result["s"] is False and "job expired" in result["r"]
    assert await queued(pool) == []


async def sleeps(ctx: dict[str, Any], job_id: str) -> None:
    await asyncio.sleep(30)


async def test_a_job_cancelled_by_its_worker_stopping_goes_back_to_the_queue(
    pool: ArqRedis,
) -> None:
    assert await jobs.enqueue(pool, "sleeps", "again-1")
    found = running_worker(pool, sleeps)
    await found.start_jobs(await queued(pool))
    await asyncio.sleep(0.1)
    (task,) = found.tasks.values()
    task.cancel()  # what the worker's shutdown does to the jobs it runs
    await asyncio.gather(task, return_exceptions=True)
    assert await queued(pool) == [b"again-1"]  # for its next run
    assert not await pool.exists(in_progress_key_prefix + "again-1")  # any worker may take it
    assert await pool.get(retry_key_prefix + "again-1") == b"1"  # the next run is try 2
    assert not await pool.exists(result_key_prefix + "again-1")
    assert found.jobs_retried == 1


async def test_a_job_aborted_while_it_runs_is_finished(pool: ArqRedis) -> None:
    assert await jobs.enqueue(pool, "sleeps", "stop-1")
    found = running_worker(pool, sleeps)
    found.allow_abort_jobs = True
    await found.start_jobs(await queued(pool))
    await asyncio.sleep(0.1)
    await pool.zadd(abort_jobs_ss, {"stop-1": 1})
    await found._cancel_aborted_jobs()
    for task in list(found.tasks.values()):
        await task
    result = jobs.deserialize(await pool.get(result_key_prefix + "stop-1"))
    assert result["s"] is False and result["r"].startswith("CancelledError")
    assert await queued(pool) == []


async def test_a_job_over_its_timeout_is_finished_as_failed(pool: ArqRedis) -> None:
    assert await jobs.enqueue(pool, "sleeps", "slow-1")
    found = running_worker(pool, sleeps, job_timeout=0.2)
    await run_queue(found, pool)
    result = jobs.deserialize(await pool.get(result_key_prefix + "slow-1"))
    assert result["s"] is False and result["r"].startswith("TimeoutError")
    assert await queued(pool) == []


async def test_jobs_ending_together_finish_in_one_script(pool: ArqRedis) -> None:
    for index in range(20):
        assert await jobs.enqueue(pool, "answer", f"many-{index}", word=str(index))
    found = running_worker(pool, answer)
    found.max_jobs = 20
    sent = 0
    original = JobEnds._send

    async def counting(self: JobEnds, batch: list[Any]) -> None:
        nonlocal sent
        sent += 1
        await original(self, batch)

    JobEnds._send = counting  # type: ignore[method-assign]
    try:
        await run_queue(found, pool)
    finally:
        JobEnds._send = original  # type: ignore[method-assign]
    assert await queued(pool) == []
    for index in range(20):
        result = jobs.deserialize(await pool.get(result_key_prefix + f"many-{index}"))
        assert result["r"] == f"{index} from try 1"
    assert sent < 20  # the jobs that ended in the same tick went out together


async def test_a_job_its_function_cannot_take_fails_as_a_job(pool: ArqRedis) -> None:
    assert await jobs.enqueue(pool, "answer", "odd-1", word="x", unknown="y")
    found = running_worker(pool, answer)
    await run_queue(found, pool)  # raises nothing: the worker goes on
    result = jobs.deserialize(await pool.get(result_key_prefix + "odd-1"))
    assert result["s"] is False and result["r"].startswith("TypeError")
    assert await queued(pool) == [] and found.jobs_failed == 1


async def test_a_worker_whose_loop_lags_leaves_new_jobs_in_the_queue(pool: ArqRedis) -> None:
    """Admission: while a running generation starves the worker's event loop (here a job that
    blocks it for 0.2 s at a time), the worker measures the lag and takes nothing new; the
    next job waits in the queue, where another worker could take it, and runs once the loop
    is free again."""
    hogged = 0

    async def hog(ctx: dict[str, Any], job_id: str) -> None:
        nonlocal hogged
        for _ in range(10):
            time.sleep(0.2)  # noqa: ASYNC251 - the point: the loop gets no turn meanwhile
            hogged += 1
            await asyncio.sleep(0)

    started_after: list[int] = []

    async def later(ctx: dict[str, Any], job_id: str) -> None:
        started_after.append(hogged)

    found = WakeableWorker(
        functions=[func(hog, name="hog"), func(later, name="later")],
        queue_name=keys.QUEUE,
        redis_pool=pool,
        max_jobs=10,
        wake_timeout=0.05,
        job_timeout=30,
        keep_result=60,
        job_serializer=jobs.serialize,
        job_deserializer=jobs.deserialize,
    )

    async def polling() -> None:
        while True:
            await found._poll_iteration()

    poller = asyncio.create_task(polling())
    try:
        assert await jobs.enqueue(pool, "hog", "hog")
        await _until(lambda: hogged >= 4)  # lagging: 0.2 s per sample, over ADMISSION_LAG
        assert found.lag > ADMISSION_LAG
        assert await jobs.enqueue(pool, "later", "later")
        await _until(lambda: hogged >= 8)
        assert "later" not in found.tasks  # not taken ...
        assert await pool.zscore(keys.QUEUE, "later") is not None  # ... still queued
        assert not await pool.exists(in_progress_key_prefix + "later")
        async with asyncio.timeout(10):
            while not await pool.exists(result_key_prefix + "later"):
                await asyncio.sleep(0.05)  # the loop is free again: taken and run
        assert started_after == [10]  # once the hog had let go of the loop
    finally:
        await _stop(found, poller)


async def _until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not check():
            await asyncio.sleep(0.01)


async def _stop(found: WakeableWorker, poller: asyncio.Task[None]) -> None:
    """Cancel the poll loop and what the worker started (its own `close` is arq's)."""
    tasks = [poller, found._wake_task, found._lag_task, *found.tasks.values()]
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
