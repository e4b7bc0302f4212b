"""How arq jobs cross Redis: JSON, never pickle.

arq pickles job arguments by default, so anyone who can write to Redis (often reachable by the
whole LAN, often without a password) could run code in the worker. HAIA's job arguments are
plain data, so they travel as JSON; a job that does not decode is refused by arq (logged,
failed, not run) and the sweep ends its generation.
"""

from __future__ import annotations

import json
from typing import Any

from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms

from app import keys
from app.script_calls import script_calls


def _plain(value: Any) -> Any:
    if isinstance(value, BaseException):  # arq stores a failed job's exception as its result
        return f"{type(value).__name__}: {value}"
    raise TypeError(f"{type(value).__name__} cannot cross Redis as JSON")


def serialize(data: dict[str, Any]) -> bytes:
    return json.dumps(data, default=_plain, separators=(",", ":")).encode()


def deserialize(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("a job is a JSON object")
    return data


_ENQUEUE = """
-- KEYS: the job, its result, the queue, the in-flight hash. ARGV: the job's id, its
-- serialized job, its lifetime (ms), its score, the in-flight entry ('' for none), the
-- wake-up channel. As arq's enqueue_job (no job and no result under this id: store it and
-- queue it), with the in-flight entry written first and the workers woken, in one round trip.
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
    return 0
end
if ARGV[5] ~= '' then
    redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
end
redis.call('PSETEX', KEYS[1], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('PUBLISH', ARGV[6], ARGV[1])
return 1
"""


async def enqueue(
    redis: ArqRedis,
    function: str,
    job_id: str,
    *,
    inflight: dict[str, Any] | None = None,
    **kwargs: Any,
) -> bool:
    """Queue `function(job_id, **kwargs)` under `job_id` for the workers and wake them, with
    its `haia:inflight` entry: one script, where arq's `enqueue_job` and the two writes around
    it took five round trips of every request; the enqueues of a burst share one write
    (`app.script_calls`). False when that job exists already.

    The job is stored exactly as arq stores it (`serialize_job`, JSON), and its lifetime is
    arq's default (a day)."""
    now = timestamp_ms()
    job = serialize_job(function, (job_id,), kwargs, None, now, serializer=serialize)
    calls = script_calls(redis)
    done = await calls.call(
        calls.script(_ENQUEUE),
        [job_key_prefix + job_id, result_key_prefix + job_id, keys.QUEUE, keys.INFLIGHT],
        [
            job_id,
            job,
            redis.expires_extra_ms,
            now,
            json.dumps(inflight) if inflight is not None else "",
            keys.WAKE_CHANNEL,
        ],
    )
    return bool(done)
