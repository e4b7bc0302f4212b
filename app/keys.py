"""Every Redis key and channel HAIA uses, in one place, all under the `haia:` prefix.

arq keeps its own job bookkeeping under `arq:job:*`, `arq:in-progress:*` and `arq:result:*`.
"""

PREFIX = "haia:"
QUEUE = f"{PREFIX}queue"
"""The arq queue (a sorted set of job ids); arq's health key is `haia:queue:health-check`."""
HEALTH_CHECK = f"{QUEUE}:health-check"
WAKE_CHANNEL = f"{QUEUE}:wake"
"""Published after every enqueue so idle workers start the job without waiting for a poll."""


def gen_channel(completion_id: str) -> str:
    """The pub/sub channel carrying a generation's events."""
    return f"{PREFIX}gen:{completion_id}"


def gen_log(completion_id: str) -> str:
    """The list holding every event of a generation, for replay."""
    return f"{PREFIX}gen:{completion_id}:log"
