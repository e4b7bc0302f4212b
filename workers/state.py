"""The worker's typed context: what every job of one worker process shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis

from app.config import Settings
from app.publish import Batcher
from workers.heartbeat import Heartbeat
from workers.openai_wire import OpenAIWire


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
    shutting_down: bool = False
    """Set on SIGINT/SIGTERM: a cancelled job is being handed back, not cancelled by a user."""


def state(ctx: dict[str, Any]) -> WorkerState:
    """The `WorkerState` arq carries in every job's `ctx`."""
    return cast(WorkerState, ctx["haia"])
