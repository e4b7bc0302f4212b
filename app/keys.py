"""Every Redis key and channel HAIA uses, in one place, all under the `haia:` prefix.

arq keeps its own job bookkeeping under `arq:job:*`, `arq:in-progress:*` and `arq:result:*`.
"""

from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

PREFIX = "haia:"
QUEUE = f"{PREFIX}queue"
"""The arq queue (a sorted set of job ids); arq's health key is `haia:queue:health-check`."""
WAKE_CHANNEL = f"{QUEUE}:wake"
"""Published after every enqueue so idle workers start the job without waiting for a poll."""


def gen_channel(completion_id: str) -> str:
    """The pub/sub channel carrying a generation's events."""
    return f"{PREFIX}gen:{completion_id}"


def gen_log(completion_id: str) -> str:
    """The list holding every event of a generation, for replay."""
    return f"{PREFIX}gen:{completion_id}:log"


def owner_streams(owner: str) -> str:
    """Sorted set: the owner's open SSE streams (lease id → when the lease lapses)."""
    return f"{PREFIX}streams:{owner}"


INFLIGHT = f"{PREFIX}inflight"
"""Hash: completion id → JSON of every running generation (conversation, model, tokens, worker…)."""


def gen_cancel(completion_id: str) -> str:
    """Set when a client asked to cancel the generation."""
    return f"{PREFIX}gen:{completion_id}:cancel"


def worker_heartbeat(worker_id: str) -> str:
    """Exists while the worker is alive (refreshed every few seconds, with a short TTL)."""
    return f"{PREFIX}worker:{worker_id}"


def arq_job_keys(job_id: str) -> tuple[str, ...]:
    """arq's own records of a job."""
    return (job_key_prefix + job_id, in_progress_key_prefix + job_id, retry_key_prefix + job_id)


def arq_in_progress(job_id: str) -> str:
    return in_progress_key_prefix + job_id


def arq_retry(job_id: str) -> str:
    return retry_key_prefix + job_id


def response_meta(response_id: str) -> str:
    """A `store: false` response's owner and request metadata: what lets its events be
    resumed after its rows are gone (expires with its replay log)."""
    return f"{PREFIX}gen:{response_id}:meta"


def gen_fence(completion_id: str) -> str:
    """Which run may write the generation's events: its attempt number, or `end` once ended."""
    return f"{PREFIX}gen:{completion_id}:fence"


WORKER_PATTERN = f"{PREFIX}worker:*"
"""Matches every live worker's heartbeat key: what `/health`, `/metrics` and the reaper trust."""

METRICS_HTTP = f"{PREFIX}metrics:http_requests"
"""Hash: JSON `[route, status]` → requests answered by every web process."""
METRICS_GENERATIONS = f"{PREFIX}metrics:generations"
"""Hash: JSON `[model, status]` → generations ended."""
METRICS_TOKENS = f"{PREFIX}metrics:tokens"
"""Hash: JSON `[model, kind]` (kind `prompt` or `completion`) → tokens counted."""
METRICS_TTFT = f"{PREFIX}metrics:ttft"
"""Hash: JSON `[model, bucket]` → generations whose first token came within that bucket (not
cumulative; `+Inf` for the last), and `[model, "sum"]` / `[model, "count"]`."""


def upstream_running(upstream: str) -> str:
    """Hash: completion id → worker id of each generation holding a slot on `upstream` (only
    upstreams with `HAIA_UPSTREAM_<NAME>_MAX_CONCURRENT`)."""
    return f"{PREFIX}upstream:{upstream}:running"


def upstream_waiting(upstream: str) -> str:
    """Sorted set: completion ids waiting for a slot on `upstream`, scored by arrival (ms)."""
    return f"{PREFIX}upstream:{upstream}:waiting"


def upstream_waiters(upstream: str) -> str:
    """Hash: completion id → worker id of each generation waiting for a slot on `upstream`."""
    return f"{PREFIX}upstream:{upstream}:waiters"
