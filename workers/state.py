"""The worker's typed context: what every job of one worker process shares."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis

from app.config import Settings
from app.publish import Batcher
from workers.heartbeat import Heartbeat
from workers.openai_wire import OpenAIWire

STARTING_AT_ONCE = 8
"""Generations of one worker between being taken and sending their model request, at once.

Starting one is a few statements and round trips, each an await. When hundreds are taken
together and all proceed at once, the event loop shares itself among them and each one's
model request waits for nearly all of them. Eight at a time, in queue order, keeps the
database and Redis busy while the first requests go out after a few starts' work: the median
first token comes twice as early, and the last no later."""


@dataclass
class WorkerState:
    settings: Settings
    worker_id: str
    redis_url: str
    redis: Redis = field(init=False)
    batcher: Batcher = field(init=False)
    heartbeat: Heartbeat = field(init=False)
    wire: OpenAIWire = field(init=False)
    models: dict[str, Any] = field(default_factory=dict)
    """pydantic-ai models by id, built on first use (`workers.pydantic_model`)."""
    starting: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(STARTING_AT_ONCE))
    """Start slots (`STARTING_AT_ONCE`), taken in queue order."""
    shutting_down: bool = False
    """Set on SIGINT/SIGTERM: a cancelled job is being handed back, not cancelled by a user."""


def state(ctx: dict[str, Any]) -> WorkerState:
    """The `WorkerState` arq carries in every job's `ctx`."""
    return cast(WorkerState, ctx["haia"])
