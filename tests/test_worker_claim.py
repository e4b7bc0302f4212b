"""Which queued jobs a worker's poll takes (`WakeableWorker.start_jobs`, one Lua script).

arq's queue lists a job until it finishes, so a poll sees the jobs every worker runs. Those of
other workers must be passed over without using this worker's free slots: a new job behind
them is taken as long as this worker has room.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

from app import jobs, keys
from tests.conftest import REDIS_BASE
from workers.main import WakeableWorker


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

    async def run_job(job_id: str, score: int) -> None:
        started.append(job_id)

    found.run_job = run_job  # type: ignore[method-assign]
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
