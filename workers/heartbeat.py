"""The worker's liveness, kept by a thread of its own.

A worker that is busy (hundreds of streams, a slow callback, a long GC pause) must never be
taken for dead. The heartbeat therefore does not wait for the event loop: a daemon thread with
its own Redis connection refreshes `haia:worker:{id}` (TTL `HAIA_WORKER_DEAD_AFTER`) four times
per TTL. It stops only with the process: SIGKILL, a crash or an exit lets the key expire, and
the reaper notices within `HAIA_WORKER_DEAD_AFTER`.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(self, redis_url: str, key: str, *, ttl: float) -> None:
        super().__init__(name="haia-heartbeat", daemon=True)
        self._client = redis.Redis.from_url(
            redis_url, socket_timeout=ttl / 4, socket_connect_timeout=ttl / 4
        )
        self._key = key
        self._ttl_ms = int(ttl * 1000)
        self._interval = ttl / 4
        self._stopped = threading.Event()
        self.beats = 0

    def beat(self) -> bool:
        try:
            self._client.set(self._key, "1", px=self._ttl_ms)
        except RedisError as exc:
            log.warning("heartbeat failed (%s)", type(exc).__name__)
            return False
        self.beats += 1
        return True

    def run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.beat()

    def stop(self) -> None:
        """Stop beating and remove the key: a clean exit is not a death."""
        self._stopped.set()
        if self.is_alive():
            self.join(self._interval + 1)
        with contextlib.suppress(RedisError):
            self._client.delete(self._key)
        self._client.close()
