"""The arq job: one model request for one assistant turn, every delta published, the end stored.

A gateway makes one model request per turn and runs no agent loop; the request itself, with
an alias's fallbacks and the retries, is `workers.model_call.stream_model`. Before the run
takes the generation, it waits (still `queued`) for a slot of its upstream when that upstream
is limited (`workers.lease`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app import keys
from app.db import raw
from app.db.models import FINISHED, Message, Status
from app.errors import HaiaError, InvalidRequest, UpstreamTimeout
from app.events import Event
from app.generations import Ending, end_as, end_run, take_fence, ttls
from app.inflight import Inflight
from app.logs import request_id_var
from app.publish import Fenced, Publisher
from app.script_calls import script_calls
from app.turns import queued_message
from app.upstreams import Upstream, model_chain
from workers.context import Context, load_context
from workers.lease import Lease
from workers.model_call import first_upstream, stream_model
from workers.state import WorkerState, state

log = logging.getLogger(__name__)

# KEYS: the generation's fence, its cancel flag, its replay log.
_WHAT_REDIS_KNOWS = """
return {redis.call('GET', KEYS[1]), redis.call('EXISTS', KEYS[2]),
        redis.call('LRANGE', KEYS[3], 0, -1)}
"""

PROGRESS_EVERY = 16
"""Deltas between updates of the token count in `haia:inflight`."""


async def generate(
    ctx: dict[str, Any],
    completion_id: str,
    *,
    options: dict[str, Any] | None = None,
    request_id: str | None = None,
    stored: dict[str, Any] | None = None,
) -> str:
    """Generate the assistant turn stored under `completion_id`; return its final status.

    `stored`: the queued row as the web stored it (`app.turns.stored_row`). A first run starts
    from it instead of reading the row back; whatever changed since (ended, cancelled, taken)
    the fence's compare-and-set finds. A later run reads the row: an earlier one changed it.
    """
    st = state(ctx)
    request_id_var.set(request_id or "-")
    if int(ctx.get("job_try", 1)) > 1:
        stored = None
    async with Starting(st.starting) as starting:
        return await _generate_started(st, completion_id, options, starting, stored)


class Starting:
    """One of the worker's start slots, held from the job's start until its model request is
    about to go out (`release`), or while it does not wait for anything else: a generation
    waiting for a slot of a limited upstream gives its start slot back meanwhile."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._held = False

    async def __aenter__(self) -> Starting:
        await self.acquire()
        return self

    async def __aexit__(self, *_: object) -> None:
        self.release()

    async def acquire(self) -> None:
        if not self._held:
            await self._slots.acquire()
            self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()


async def _generate_started(
    st: WorkerState,
    completion_id: str,
    options: dict[str, Any] | None,
    starting: Starting,
    stored: dict[str, Any] | None,
) -> str:
    # The row (unless the job carries it), and what Redis knows of it (ended? cancelled? text
    # from an earlier run?), read at the same time: each is a round trip before the request.
    calls = script_calls(st.redis)  # the reads of a burst of starts share one write
    reads = calls.call(
        calls.script(_WHAT_REDIS_KNOWS),
        [
            keys.gen_fence(completion_id),
            keys.gen_cancel(completion_id),
            keys.gen_log(completion_id),
        ],
        [],
    )
    message: Message | None
    if stored is not None:
        message = queued_message(completion_id, stored)
        fence, cancelled, logged = await reads
    else:
        message, (fence, cancelled, logged) = await asyncio.gather(
            raw.first(Message, completion_id=completion_id), reads
        )
    if message is None or message.status in FINISHED:
        return "skipped"
    if fence == b"end":
        return "skipped"  # ended elsewhere (cancelled while queued, timed out in the queue)
    if cancelled:
        await end_as(st.redis, st.settings, completion_id, status=Status.CANCELLED)
        return Status.CANCELLED.value
    if any(Event.from_json(raw).type == "delta" for raw in logged):
        # An earlier run streamed text before its worker stopped: restarting would repeat it
        # to attached clients, so the generation ends here with what was said.
        await end_as(st.redis, st.settings, completion_id, status=Status.INTERRUPTED)
        return Status.INTERRUPTED.value
    lease = Lease(
        st.redis,
        completion_id=completion_id,
        worker=st.worker_id,
        arrival_ms=int(message.created_at.timestamp() * 1000),
    )
    try:
        return await _take_and_run(st, message, lease, options or {}, starting)
    finally:
        await asyncio.shield(lease.leave())


async def _take_and_run(
    st: WorkerState, message: Message, lease: Lease, options: dict[str, Any], starting: Starting
) -> str:
    """Wait (still `queued`) for a slot on the first model's upstream, then run."""
    completion_id = str(message.completion_id)
    first = first_upstream(st, message.model or "")
    if first is not None and first.max_concurrent:

        async def waiting(upstream: Upstream) -> None:
            log.info("generation %s waits for a slot on %s", completion_id, upstream.name)
            await Inflight(st.redis).waiting(
                completion_id,
                conversation=message.conversation_id,  # type: ignore[attr-defined]
                model=message.model or "",
                request_id=message.request_id or "-",
                worker=st.worker_id,
                upstream=upstream.name,
            )

        starting.release()  # no start slot held while waiting for the upstream's
        entered = await lease.enter(first, on_wait=waiting)
        await starting.acquire()
        if not entered:
            if await st.redis.exists(keys.gen_cancel(completion_id)):
                await end_as(st.redis, st.settings, completion_id, status=Status.CANCELLED)
            return "skipped"  # ended while it waited (cancelled, or timed out in the queue)
    model = model_chain(message.model or "", st.settings.aliases)[0]
    entry = Inflight.running_entry(
        conversation=message.conversation_id,  # type: ignore[attr-defined]
        model=model,
        request_id=message.request_id or "-",
        worker=st.worker_id,
        attempt=message.attempt + 1,  # the token `take_fence` takes
    )
    # The context is read from the database while Redis takes the fence, announces the run
    # and lists it in `haia:inflight` (one script).
    loading = asyncio.ensure_future(
        load_context(
            message, limit=st.settings.context_messages, responses=options.get("responses")
        )
    )
    try:
        run = await take_fence(
            st.redis,
            st.settings,
            message,
            status=Status.IN_PROGRESS,
            start=Event(seq=0, type="start", status="in_progress", model=model),
            inflight=entry,
        )
    except BaseException:
        _drop(loading)
        raise
    if run is None:
        _drop(loading)
        return "skipped"
    publisher = Publisher(st.redis, completion_id, run.token, ttls(st.settings), st.batcher)
    return await _generate(st, message, publisher, options, lease, entry, loading, starting)


def _drop(task: asyncio.Future[Any]) -> None:
    """Cancel `task`, whose outcome is no longer wanted (retrieved, so never logged)."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


@dataclass
class _Progress:
    """What a run has produced so far; forwards every delta to the run's publisher."""

    publisher: Publisher
    on_count: Callable[[int], None]
    parts: list[str] = field(default_factory=list)
    reasoning_parts: list[str] = field(default_factory=list)
    first_token_at: datetime | None = None
    count: int = 0
    model: str | None = None
    """The model answering now."""

    def _seen(self) -> None:
        if self.publisher.fenced:
            raise Fenced(self.publisher.completion_id)
        if self.first_token_at is None:
            self.first_token_at = datetime.now(UTC)
        self.count += 1
        if self.count % PROGRESS_EVERY == 0:
            self.on_count(self.count)

    def delta(self, text: str) -> None:
        self._seen()
        self.parts.append(text)
        self.publisher.delta(text)

    def reasoning(self, text: str) -> None:
        self._seen()
        self.reasoning_parts.append(text)
        self.publisher.reasoning(text)

    def tool(self, piece: dict[str, Any]) -> None:
        self._seen()
        self.publisher.tool(piece)


async def _generate(
    st: WorkerState,
    message: Message,
    publisher: Publisher,
    options: dict[str, Any],
    lease: Lease,
    entry: dict[str, Any],
    loading: asyncio.Future[Context],
    starting: Starting,
) -> str:
    completion_id = str(message.completion_id)
    inflight = Inflight(st.redis)
    model = str(entry["model"])
    # DEBUG: at hundreds of generations a second, a second INFO line per generation cost a
    # twentieth of the worker's CPU; the end's line says how each one went.
    log.debug("generation %s started on %s (run %d)", completion_id, model, publisher.token)

    ending = Ending(status=Status.COMPLETED)
    progress = _Progress(
        publisher=publisher,
        on_count=lambda n: publisher.progress(Inflight.progress_entry(entry, n)),
        model=model,
    )

    async def announce(fallback: str) -> None:
        progress.model = entry["model"] = fallback
        await asyncio.gather(inflight.running(completion_id, entry), publisher.start(fallback))

    try:
        async with asyncio.timeout(st.settings.job_timeout) as deadline:
            context = await loading
            starting.release()  # the model request goes out now: the next one may start
            ending.previous_hash = context.rows[-1].prefix_hash  # the turn this answers
            outcome = await stream_model(
                st,
                model_id=message.model or "",
                prompt=context,
                options=options,
                sink=progress,
                lease=lease,
                announce=announce,
            )
        outcome.apply(ending)
    except Fenced:
        log.warning("generation %s: this run was superseded; stopping it", completion_id)
        return "superseded"
    except asyncio.CancelledError:
        if st.shutting_down and not await st.redis.exists(keys.gen_cancel(completion_id)):
            # Worker shutdown: arq hands the job back; its next run decides what to do. What
            # was said so far must be in the log for that decision.
            await asyncio.shield(_hand_back(publisher, inflight, completion_id))
            raise
        ending.status, ending.finish_reason = Status.CANCELLED, "stop"
        await asyncio.shield(_end(publisher, message, ending, progress, inflight))
        raise
    except Exception as exc:
        ending.status = Status.FAILED
        ending.error = _failure(exc, st, message, timed_out=deadline.expired())
        log.warning(
            "generation %s failed: %s",
            completion_id,
            type(exc).__name__,
            exc_info=ending.error.status == 500,
        )
    await asyncio.shield(_end(publisher, message, ending, progress, inflight))
    return ending.status.value


def _failure(exc: Exception, st: WorkerState, message: Message, *, timed_out: bool) -> HaiaError:
    if isinstance(exc, TimeoutError) and timed_out:
        return UpstreamTimeout(
            f"The generation ran longer than HAIA_JOB_TIMEOUT "
            f"({st.settings.job_timeout} s); the partial answer was kept.",
            code="generation_timeout",
        )
    if isinstance(exc, HaiaError):
        return exc
    if isinstance(exc, LookupError):  # from load_context: the stored turn has nothing to answer
        return InvalidRequest(f"Nothing to answer: {exc}.", param="messages")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("The model's server did not answer within HAIA_LLM_TIMEOUT.")
    return HaiaError("The generation failed unexpectedly.")


async def _hand_back(publisher: Publisher, inflight: Inflight, completion_id: str) -> None:
    try:
        await publisher.flush()
    finally:
        await inflight.remove(completion_id)


async def _end(
    publisher: Publisher,
    message: Message,
    ending: Ending,
    progress: _Progress,
    inflight: Inflight,
) -> None:
    ending.text = "".join(progress.parts)
    ending.reasoning = "".join(progress.reasoning_parts)
    ending.first_token_at = progress.first_token_at
    if ending.status == Status.COMPLETED or progress.count:
        ending.model = progress.model  # it answered, at least in part
    ended = False
    try:
        ended = await end_run(publisher, message, ending)  # its `end` leaves `haia:inflight`
        if ended:
            log.info(
                "generation %s ended %s (%d deltas)",
                message.completion_id,
                ending.status.value,
                progress.count,
            )
    finally:
        if not ended:
            await inflight.remove(str(message.completion_id))
