"""A generation's lifecycle, in one place: claiming a run, ending it, and finding lost ones.

Who may end a generation is decided by the fence (`app.publish`): exactly one `end` event is
ever appended, by the run that holds the fence or by a process that ends it on a dead run's
behalf (the reaper, a cancel while queued, a queue timeout, the sweep). Whoever appended the
`end` then stores the outcome in the database, retrying while the database is away; the replay
log holds the outcome meanwhile, and the sweep stores it from there if that process dies too.

`end_run` is the only producer of `end` events for stored generations; `take_fence` the only
way to become their writer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from arq.constants import abort_jobs_ss
from arq.utils import timestamp_ms
from redis.asyncio import Redis
from tortoise.exceptions import BaseORMException
from tortoise.queryset import QuerySet, QuerySetSingle

from app import keys
from app.config import Settings
from app.content import stored_identity
from app.counters import Counter, generation_counters
from app.db import raw
from app.db.group import together
from app.db.models import ACTIVE, Conversation, Message, Response, Status
from app.errors import HaiaError, Unavailable
from app.events import Event, answering_model
from app.inflight import Inflight
from app.publish import Fenced, Publisher, Ttls, append, claim, fence_of
from app.schemas import Usage
from app.slots import Slots
from app.turns import digest

log = logging.getLogger(__name__)

RESPONSE_PREFIX = "resp_"
"""Responses API generations: ids `resp_…` (see `app.routes.responses`)."""

MAX_TRIES = 3
"""Runs of one generation arq may start (a worker death before the first token reruns it)."""

STORE_FIRST_WINDOW = 2.0
"""Seconds an ending retries its database write before announcing the end anyway."""
STORE_RETRY_WINDOW = 120.0
"""Seconds an ending keeps retrying its database write before leaving it to the sweep."""
SWEEP_EVERY = 5.0
"""Seconds between sweeps for stuck rows (a row is ended on its second sighting)."""
END_RETRY_WINDOW = 30.0
"""Seconds an ending keeps retrying its `end` event while Redis is away."""


def ttls(settings: Settings) -> Ttls:
    return Ttls(running=settings.job_timeout + settings.replay_ttl, final=settings.replay_ttl)


def interrupted_error() -> HaiaError:
    return Unavailable(
        "The worker running this generation stopped; the partial answer was kept.",
        code="generation_interrupted",
    )


def no_worker_error(settings: Settings) -> HaiaError:
    return Unavailable(
        f"No worker picked up the request within {settings.queue_timeout:g} s "
        "(HAIA_QUEUE_TIMEOUT); check that the `worker` process is running.",
        code="no_worker",
    )


def cancelled_detail() -> dict[str, Any]:
    return {
        "message": "The generation was cancelled.",
        "type": "cancelled",
        "param": None,
        "code": "cancelled",
    }


async def logged_events(redis: Redis, completion_id: str) -> list[Event]:
    raw = await cast(Awaitable[list[bytes]], redis.lrange(keys.gen_log(completion_id), 0, -1))
    return [Event.from_json(item) for item in raw]


def text_of(events: list[Event]) -> str:
    return "".join(event.text for event in events if event.type == "delta")


def reasoning_of(events: list[Event]) -> str:
    return "".join(event.reasoning for event in events if event.type == "delta")


def add_tool_piece(calls: dict[int, dict[str, Any]], piece: dict[str, Any]) -> None:
    """Add one streamed piece of a tool call (`index`, `id`/`name` first, `arguments`)."""
    call = calls.setdefault(
        int(piece["index"]),
        {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
    )
    call["id"] = piece.get("id") or call["id"]
    call["function"]["name"] = piece.get("name") or call["function"]["name"]
    call["function"]["arguments"] += piece.get("arguments") or ""


def assembled(calls: dict[int, dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The tool calls pieces added up to, in the OpenAI shape, by index."""
    return [calls[index] for index in sorted(calls)] or None


def tool_calls_of(events: list[Event]) -> list[dict[str, Any]] | None:
    """The tool calls the deltas of a log assemble."""
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        if event.type == "delta" and event.tool is not None:
            add_tool_piece(calls, event.tool)
    return assembled(calls)


@dataclass
class Ending:
    """How a generation ended; stored on its message and announced as the `end` event."""

    status: Status
    text: str = ""
    reasoning: str = ""
    reasoning_parts: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    previous_hash: str | None = None
    """The digest of the conversation before this turn, when the run already read it."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    """Of `completion_tokens`, the thinking, when the upstream reported it."""
    first_token_at: datetime | None = None
    error: HaiaError | None = None
    error_detail: dict[str, Any] | None = None
    model: str | None = None
    """The model that answered (stored on the row), when one did."""
    finished_at: datetime | None = None
    """When it ended: fixed by the first of storing or announcing it, so the row and the
    `end` event name the same instant."""

    def ended_at(self) -> datetime:
        if self.finished_at is None:
            self.finished_at = datetime.now(UTC)
        return self.finished_at

    def usage(self) -> dict[str, Any] | None:
        usage = Usage.of(self.prompt_tokens, self.completion_tokens)
        if usage is None:
            return None
        data: dict[str, Any] = usage.model_dump()
        if self.reasoning_tokens is not None:
            data["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return data

    def detail(self) -> dict[str, Any] | None:
        return self.error.body()["error"] if self.error else self.error_detail

    def event(self) -> Event:
        return Event(
            seq=0,
            type="end",
            status=self.status.value,
            model=self.model,
            finish_reason=self.finish_reason,
            usage=self.usage(),
            error=self.detail(),
            http_status=self.error.status if self.error else None,
            retry_after=self.error.retry_after if self.error else None,
            at=int(self.ended_at().timestamp()),
        )

    @classmethod
    def from_log(cls, events: list[Event]) -> Ending:
        """The outcome an `end` event in a replay log announced."""
        end = events[-1]
        usage = end.usage or {}
        return cls(
            status=Status(end.status or Status.FAILED),
            text=text_of(events),
            reasoning=reasoning_of(events),
            tool_calls=tool_calls_of(events),
            finish_reason=end.finish_reason,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            error_detail=end.error,
            model=answering_model(events),
            finished_at=datetime.fromtimestamp(end.at, UTC) if end.at is not None else None,
        )


@dataclass
class Run:
    """One holder of a generation's fence: a worker's attempt, or a process ending it."""

    message: Message
    token: int


async def take_fence(
    redis: Redis,
    settings: Settings,
    message: Message,
    *,
    status: Status | None = None,
    only_if: frozenset[Status] = ACTIVE,
    start: Event | None = None,
    inflight: dict[str, Any] | None = None,
) -> Run | None:
    """Become the only writer of `message`'s generation: bump its attempt (the fencing token)
    in the row, compare-and-set, then take the fence in Redis. Whoever held it before is fenced
    out of both. None when the generation has ended, or someone else got there first.

    A worker's run passes `status=IN_PROGRESS`, its `start` event and its `inflight` entry
    (written with the fence, in the same round trip); a process ending it on a dead or absent
    run's behalf leaves the status to the ending.
    """
    token = message.attempt + 1
    changes: dict[str, Any] = {"attempt": token}
    if status is not None:
        changes.update(status=status, started_at=datetime.now(UTC))
    claimed = await together(  # with the other fences of this moment: one commit
        lambda: raw.update(Message, changes, id=message.id, attempt=message.attempt, status=only_if)
    )
    if not claimed:
        return None
    try:
        await claim(
            redis,
            str(message.completion_id),
            token,
            ttls(settings),
            start=start,
            inflight=json.dumps(inflight) if inflight is not None else "",
        )
    except Fenced:
        return None
    message.attempt = token
    if status is not None:
        message.status = status
    return Run(message=message, token=token)


async def end_run(publisher: Publisher, message: Message, ending: Ending) -> bool:
    """The one way a stored generation ends: store `ending` on the row, then announce it.

    Both steps are fenced by the run's token, so a run that lost its claim changes nothing and
    there is only ever one `end`. Stored first, so a client that reads the conversation right
    after `[DONE]` finds the answer there. If the database is away, the end is announced anyway
    (attached clients must not hang; the replay log holds the outcome) and the write is retried;
    past `STORE_RETRY_WINDOW` the sweep stores it from the log. Returns False when fenced out.
    """
    stored = await store_ending(message, ending, token=publisher.token, within=STORE_FIRST_WINDOW)
    if stored is False:
        log.warning("%s was ended elsewhere; this run stops", publisher.completion_id)
        publisher.fenced = True
        return False
    first = message.first_token_at or ending.first_token_at
    counters = generation_counters(
        model=ending.model or message.model or "unknown",
        status=ending.status.value,
        ttft_seconds=(first - message.created_at).total_seconds() if first else None,
        prompt_tokens=ending.prompt_tokens,
        completion_tokens=ending.completion_tokens,
    )
    await _announce(publisher, ending, counters)
    if stored is None:
        await store_ending(message, ending, token=publisher.token, within=STORE_RETRY_WINDOW)
    return True


async def _announce(publisher: Publisher, ending: Ending, counters: list[Counter]) -> None:
    """Append the `end` (which also takes the generation out of `haia:inflight` and counts
    it), retrying while Redis is away for up to `END_RETRY_WINDOW`."""
    deadline = time.monotonic() + END_RETRY_WINDOW
    delay = 0.1
    event = ending.event()
    while True:
        try:
            await asyncio.wait_for(
                publisher.end(event, counters), max(deadline - time.monotonic(), 0.1)
            )
            return
        except Fenced:
            log.error("the end of %s was refused by its fence", publisher.completion_id)
            return
        except Exception as exc:  # noqa: BLE001 - Redis away: retry for a while
            if time.monotonic() > deadline:
                log.error(
                    "could not announce the end of %s (%s)",
                    publisher.completion_id,
                    type(exc).__name__,
                )
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def store_ending(
    message: Message, ending: Ending, *, token: int | None, within: float
) -> bool | None:
    """Write the outcome to the row while it is active (and, given a token, still held by
    it), retrying for `within` seconds while the database is away.

    True when stored, False when the row refused (ended, or taken by a newer run), None when
    the database stayed away.
    """
    deadline = time.monotonic() + within
    delay = 0.1
    while True:
        try:
            # With the other ends of this moment (and fences): one commit for all of them.
            return await together(
                lambda: _store(message, ending, token),
                key=message.conversation_id,  # type: ignore[attr-defined]
            )
        except (BaseORMException, OSError, ConnectionError) as exc:
            if time.monotonic() > deadline:
                log.error(
                    "could not store the end of %s yet (%s)",
                    message.completion_id,
                    type(exc).__name__,
                )
                return None
            log.warning(
                "storing the end of %s failed (%s); retrying",
                message.completion_id,
                type(exc).__name__,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def last_digested_before(message: Message) -> QuerySetSingle[Message | None]:
    """The last message before `message` in its conversation that has a digest."""
    return (
        Message.filter(
            conversation_id=message.conversation_id,  # type: ignore[attr-defined]
            id__lt=message.id,
            prefix_hash__isnull=False,
        )
        .order_by("-id")
        .first()
    )


async def _store(message: Message, ending: Ending, token: int | None) -> bool:
    finished_at = ending.ended_at()
    prefix_hash = None
    if (ending.text or ending.tool_calls) and ending.previous_hash is not None:
        prefix_hash = digest(
            ending.previous_hash,
            "assistant",
            stored_identity(ending.text, tool_calls=ending.tool_calls),
        )
    elif ending.text or ending.tool_calls:
        previous = await last_digested_before(message)
        prefix_hash = digest(
            previous.prefix_hash if previous else None,
            "assistant",
            stored_identity(ending.text, tool_calls=ending.tool_calls),
        )
    held = {"attempt": token} if token is not None else {}
    answered = {"model": ending.model} if ending.model else {}
    changes = dict(
        answered,
        content=ending.text,
        reasoning=ending.reasoning,
        reasoning_parts=ending.reasoning_parts,
        tool_calls=ending.tool_calls,
        status=ending.status,
        finish_reason=ending.finish_reason,
        prompt_tokens=ending.prompt_tokens,
        completion_tokens=ending.completion_tokens,
        first_token_at=message.first_token_at or ending.first_token_at,
        finished_at=finished_at,
        error=ending.detail(),
        prefix_hash=prefix_hash,
    )
    if not await raw.update(Message, changes, id=message.id, status=ACTIVE, **held):
        return False
    await raw.update(
        Conversation,
        {"updated_at": finished_at},
        id=message.conversation_id,  # type: ignore[attr-defined]
    )
    if str(message.completion_id).startswith(RESPONSE_PREFIX):
        await _forget_unstored(str(message.completion_id))
    return True


async def _forget_unstored(response_id: str) -> None:
    """A `store: false` response keeps nothing once it ended: its conversation (its own,
    holding only its turn) goes, with its record. Its replay log expires on its own."""
    # Plain SQL: every Responses API generation asks this at its end, and the ORM's query
    # builder made it a twelfth of the worker's CPU with such turns.
    found = await raw.values(
        Response,
        lambda s: (
            f"SELECT {s.column('conversation_id')} FROM {raw.table(Response)} "
            f"WHERE {s.where({'id': response_id, 'store': False})}"
        ),
    )
    if not found:
        return
    conversation = await Conversation.get_or_none(id=found[0][0])
    if conversation is not None:
        await conversation.delete()


async def end_as(
    redis: Redis,
    settings: Settings,
    completion_id: str,
    *,
    status: Status,
    seen_attempt: int | None = None,
    only_if: frozenset[Status] = ACTIVE,
    error: HaiaError | None = None,
) -> bool:
    """End a generation no live run will end (cancelled while queued, orphaned, stuck), keeping
    whatever text its log holds.

    Takes the fence first (so a run that is in fact alive can add nothing more); with
    `seen_attempt`, only if no newer run started since. False when it was not ended here.
    """
    message = await Message.get_or_none(completion_id=completion_id)
    if message is None:
        return await _end_unstored(redis, settings, completion_id, status, error)
    if seen_attempt is not None and message.attempt != seen_attempt:
        return False
    run = await take_fence(redis, settings, message, only_if=only_if)
    if run is None:
        return False
    # Fenced: the log cannot grow any more, its deltas are the text.
    events = await logged_events(redis, completion_id)
    ending = _ending_for(status, error)
    ending.text, ending.reasoning = text_of(events), reasoning_of(events)
    ending.tool_calls = tool_calls_of(events)
    if ending.text or ending.reasoning or ending.tool_calls:
        ending.first_token_at = message.started_at
        ending.model = answering_model(events)
    publisher = Publisher(redis, completion_id, run.token, ttls(settings))
    ended = await end_run(publisher, message, ending)  # its `end` leaves `haia:inflight`
    if not ended:
        await Inflight(redis).remove(completion_id)
    return ended


def _ending_for(status: Status, error: HaiaError | None) -> Ending:
    return Ending(
        status=status,
        finish_reason="stop" if status == Status.CANCELLED else None,
        error=error or (interrupted_error() if status == Status.INTERRUPTED else None),
        error_detail=cancelled_detail() if status == Status.CANCELLED else None,
    )


async def _end_unstored(
    redis: Redis, settings: Settings, completion_id: str, status: Status, error: HaiaError | None
) -> bool:
    """A background task (nothing stored): only the fence in Redis decides."""
    token = await fence_of(redis, completion_id)
    if token == "end":
        return False
    try:
        await append(
            redis, completion_id, token or 0, ttls(settings), [_ending_for(status, error).event()]
        )
    except Fenced:
        return False
    return True


async def reap_orphans(redis: Redis, settings: Settings, *, max_tries: int) -> list[str]:
    """Handle generations whose worker's heartbeat expired.

    One that had sent no text yet is run again at once by another worker (arq's in-progress
    marker is dropped; the new run's claim fences the old one out); one that had is ended as
    `interrupted`, keeping its partial text. Safe to run from many processes: removing the
    in-flight entry is the claim, and the fence decides who ends.
    """
    inflight = Inflight(redis)
    limited = [u.name for u in settings.upstreams.values() if u.max_concurrent]
    handled = []
    for completion_id, entry in (await inflight.entries()).items():
        worker = entry.get("worker")
        if not worker or await redis.exists(keys.worker_heartbeat(str(worker))):
            continue  # waiting in the queue, or its worker is alive
        if not await inflight.remove(completion_id):
            continue  # another process claimed it
        handled.append(completion_id)
        if limited:
            await Slots(redis).release(limited, completion_id)
        events = await logged_events(redis, completion_id)
        tries = int(await redis.get(keys.arq_retry(completion_id)) or 0)
        if any(e.type == "delta" for e in events) or tries >= max_tries:
            log.warning("generation %s lost its worker; ending it as interrupted", completion_id)
            await end_as(
                redis,
                settings,
                completion_id,
                status=Status.INTERRUPTED,
                seen_attempt=entry.get("attempt"),
            )
            await redis.zrem(keys.QUEUE, completion_id)
            await redis.delete(*keys.arq_job_keys(completion_id))
        else:
            log.warning(
                "generation %s lost its worker before its first token; rerunning", completion_id
            )
            await redis.delete(keys.arq_in_progress(completion_id))
            await redis.publish(keys.WAKE_CHANNEL, completion_id)
    return handled


def stuck_candidates(created_before: datetime, *, limit: int) -> QuerySet[Message]:
    """The oldest rows still queued or in progress that were created before `created_before`
    (found through the index on status: they are few among all the ended ones)."""
    return (
        Message.filter(status__in=list(ACTIVE), created_at__lt=created_before)
        .order_by("id")
        .limit(limit)
    )


class Sweeper:
    """Finds stored generations left `queued`/`in_progress` with no live job, and ends them.

    What leaves one behind: a web process that died between storing the turn and enqueueing
    it, a job arq gave up on (timeout, undecodable), a reaper that died between its claim and
    the end, an end whose database write outlasted its retries. A row is ended only when two
    sweeps in a row saw it stuck, so a job that is just starting is never taken for lost.
    Safe in many processes: the fence lets one of them end it.
    """

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._suspects: set[str] = set()

    async def sweep(self, *, limit: int = 200) -> list[str]:
        grace = timedelta(seconds=max(self._settings.worker_dead_after * 2, 10))
        rows = await stuck_candidates(datetime.now(UTC) - grace, limit=limit)
        stuck: set[str] = set()
        ended = []
        for row in rows:
            completion_id = str(row.completion_id)
            if await self._store_logged_end(row):
                ended.append(completion_id)
            elif not await self._alive(completion_id):
                stuck.add(completion_id)
        for completion_id in stuck & self._suspects:
            if await self._end_stuck(completion_id):
                ended.append(completion_id)
        self._suspects = stuck - set(ended)
        return ended

    async def _store_logged_end(self, row: Message) -> bool:
        """The log says it ended, the row does not: store what the log says."""
        events = await logged_events(self._redis, str(row.completion_id))
        if not events or not events[-1].is_terminal:
            return False
        log.warning("generation %s ended but was not stored; storing it", row.completion_id)
        await store_ending(row, Ending.from_log(events), token=None, within=0)
        await Inflight(self._redis).remove(str(row.completion_id))
        return True

    async def _alive(self, completion_id: str) -> bool:
        entry = await Inflight(self._redis).get(completion_id)
        if entry and entry.get("worker"):
            return True  # running: the reaper watches its worker
        pipe = self._redis.pipeline(transaction=False)
        pipe.zscore(keys.QUEUE, completion_id)
        pipe.exists(keys.arq_in_progress(completion_id))
        score, running = await pipe.execute()
        # Waiting in the queue (the web's queue timeout bounds that), or being started.
        return score is not None and (not running or bool(entry))

    async def _end_stuck(self, completion_id: str) -> bool:
        events = await logged_events(self._redis, completion_id)
        started = any(e.type == "start" for e in events)
        log.warning("generation %s has no live job; ending it", completion_id)
        ended = await end_as(
            self._redis,
            self._settings,
            completion_id,
            status=Status.INTERRUPTED if started else Status.FAILED,
            error=None if started else no_worker_error(self._settings),
        )
        if ended:
            await self._redis.zrem(keys.QUEUE, completion_id)
            await self._redis.delete(*keys.arq_job_keys(completion_id))
        return ended


async def abort_job(redis: Redis, completion_id: str) -> None:
    """Ask arq to cancel the job wherever it runs (workers check on their next poll)."""
    await redis.zadd(abort_jobs_ss, {completion_id: timestamp_ms()})
    await redis.publish(keys.WAKE_CHANNEL, completion_id)
