"""Prometheus metrics for every HAIA process, kept in Redis.

The worker has no HTTP server, and several web processes may serve one HAIA (HAIA_WEB_WORKERS,
or several hosts). So the counters and histograms live in Redis hashes that every process
increments (HINCRBY: a web's request counts every half second, a generation's in the script
that announces its end), and `GET /metrics` on any web process reads them back together with live
gauges (in-flight generations, queue depth, workers) and renders them with prometheus_client.
One scrape covers every process, and a restart of any of them loses no count. Recording never
raises: a metric must not break a request or a generation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from app import keys
from app.counters import INF, TTFT_BUCKETS, labels_field
from app.slots import Slots

log = logging.getLogger(__name__)

Labels = tuple[str, ...]


def _labels(raw: bytes | str) -> Labels:
    return tuple(str(item) for item in json.loads(raw))


FLUSH_EVERY = 0.5
"""Seconds between two additions of a web process's request counts to Redis."""


class RequestCounts:
    """Answered requests, counted in the process and added to Redis in one round trip every
    `FLUSH_EVERY` seconds, before each scrape this process answers, and at shutdown. A round
    trip of its own per request was a twentieth of the web's CPU. While Redis is away the
    counts wait in the process; a process killed outright loses its last half second."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._counts: collections.Counter[str] = collections.Counter()
        self._task: asyncio.Task[None] | None = None

    def add(self, *, route: str, status: int) -> None:
        self._counts[labels_field(route, str(status))] += 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="haia-request-counts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self.flush()

    async def flush(self) -> None:
        """Add what was counted since the last flush (never raises)."""
        counts, self._counts = self._counts, collections.Counter()
        if not counts:
            return
        pipe = self._redis.pipeline(transaction=False)
        for field_, count in counts.items():
            pipe.hincrby(keys.METRICS_HTTP, field_, count)
        try:
            await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - a lost count must not fail a request
            log.debug("requests not counted yet (%s)", type(exc).__name__)
            self._counts.update(counts)


async def live_workers(redis: Redis) -> list[str]:
    """The ids of the workers whose heartbeat key is alive (what the reaper trusts)."""
    prefix = keys.worker_heartbeat("")
    found = [key async for key in redis.scan_iter(match=keys.WORKER_PATTERN, count=1000)]
    return sorted(
        (k.decode() if isinstance(k, bytes) else str(k)).removeprefix(prefix) for k in found
    )


@dataclass
class Snapshot:
    """Every figure `/metrics` shows, as read from Redis at one moment."""

    http_requests: dict[Labels, float] = field(default_factory=dict)
    generations: dict[Labels, float] = field(default_factory=dict)
    tokens: dict[Labels, float] = field(default_factory=dict)
    ttft: dict[Labels, float] = field(default_factory=dict)
    in_flight: int = 0
    queue_depth: int = 0
    workers: int = 0
    upstreams: dict[str, tuple[int, int]] = field(default_factory=dict)
    """(running, waiting) per upstream with HAIA_UPSTREAM_<NAME>_MAX_CONCURRENT."""


async def read_snapshot(redis: Redis, *, limited: list[str] | None = None) -> Snapshot:
    """Read the counters and the live gauges (raises when Redis is away)."""
    pipe = redis.pipeline(transaction=False)
    for name in (keys.METRICS_HTTP, keys.METRICS_GENERATIONS, keys.METRICS_TOKENS):
        pipe.hgetall(name)
    pipe.hgetall(keys.METRICS_TTFT)
    pipe.hlen(keys.INFLIGHT)
    pipe.zrange(keys.QUEUE, 0, -1)
    http, generations, tokens, ttft, in_flight, queued = await pipe.execute()
    job_ids = [job.decode() if isinstance(job, bytes) else str(job) for job in queued]
    running = await redis.exists(*map(keys.arq_in_progress, job_ids)) if job_ids else 0
    return Snapshot(
        http_requests=_counts(http),
        generations=_counts(generations),
        tokens=_counts(tokens),
        ttft=_counts(ttft),
        in_flight=int(in_flight),
        queue_depth=max(len(job_ids) - int(running), 0),
        workers=len(await live_workers(redis)),
        upstreams=await Slots(redis).counts(limited or []),
    )


def _counts(raw: dict[bytes, bytes]) -> dict[Labels, float]:
    return {_labels(key): float(value) for key, value in raw.items()}


class SnapshotCollector(Collector):
    """Exposes a `Snapshot` as Prometheus metric families."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot
        yield _counter(
            "haia_http_requests",
            "HTTP requests answered by every web process, by route pattern and status.",
            ["route", "status"],
            snap.http_requests,
        )
        yield _counter(
            "haia_generations",
            "Generations ended, by model and final status.",
            ["model", "status"],
            snap.generations,
        )
        yield _counter(
            "haia_tokens",
            "Tokens the upstream counted, by model and kind (prompt or completion).",
            ["model", "kind"],
            snap.tokens,
        )
        yield _histogram(snap.ttft)
        yield GaugeMetricFamily(
            "haia_generations_in_flight", "Generations running now.", value=snap.in_flight
        )
        yield GaugeMetricFamily(
            "haia_queue_depth", "Generations waiting for a worker.", value=snap.queue_depth
        )
        yield GaugeMetricFamily(
            "haia_workers",
            "Workers alive (heartbeat within HAIA_WORKER_DEAD_AFTER).",
            value=snap.workers,
        )
        yield from _upstream_gauges(snap.upstreams)


def _upstream_gauges(counts: dict[str, tuple[int, int]]) -> Iterator[Metric]:
    running = GaugeMetricFamily(
        "haia_upstream_running",
        "Generations holding a slot of an upstream with HAIA_UPSTREAM_<NAME>_MAX_CONCURRENT.",
        labels=["upstream"],
    )
    waiting = GaugeMetricFamily(
        "haia_upstream_waiting",
        "Generations waiting in line for a slot of such an upstream.",
        labels=["upstream"],
    )
    for upstream, (held, queued) in sorted(counts.items()):
        running.add_metric([upstream], held)
        waiting.add_metric([upstream], queued)
    yield running
    yield waiting


def _counter(
    name: str, documentation: str, labels: list[str], values: dict[Labels, float]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for label_values, value in sorted(values.items()):
        if len(label_values) == len(labels):
            family.add_metric(list(label_values), value)
    return family


def _histogram(raw: dict[Labels, float]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        "haia_generation_ttft_seconds",
        "Time from a request's arrival to its generation's first token, by model.",
        labels=["model"],
    )
    for model in sorted({labels[0] for labels in raw if len(labels) == 2}):
        running, buckets = 0.0, []
        for bound in (*map(str, TTFT_BUCKETS), INF):
            running += raw.get((model, bound), 0.0)
            buckets.append((bound, running))
        family.add_metric([model], buckets=buckets, sum_value=raw.get((model, "sum"), 0.0))
    return family


def render(snapshot: Snapshot) -> bytes:
    """The Prometheus text exposition of `snapshot`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry)
