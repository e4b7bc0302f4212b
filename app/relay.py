"""Following a generation: replay what is logged, then live events, with no gap or repeat."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol, cast

from redis.asyncio import Redis

from app import keys
from app.errors import Unavailable
from app.events import Event, plain_delta
from app.hub import SILENCE, EventHub, Item, Silence


class DirectWrite(Protocol):
    """Sends one live event to the client at once if it can (True), without waiting."""

    def __call__(self, event: Event) -> bool: ...

    def text(self, seq: int, text: bytes) -> bool:
        """The same for a plain text delta whose text is still a JSON string."""
        ...


EndCheck = Callable[[int], Awaitable[Event | None]]
"""Given the last seq sent: the generation's `end` (as seq + 1) if it is over, else None."""

STALE_CHECK_EVERY = 4
"""Silent keep-alive intervals between two checks that a followed generation still runs."""


class _Inbox:
    """A queue with one consumer: a list, and a future while the consumer waits.

    Every stream has one, so it stays small: an `asyncio.Queue` carries three deques and an
    `asyncio.Event` (a fourth), about 3 KB a stream before anything is queued.
    """

    __slots__ = ("_head", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Item | Event] = []
        self._head = 0
        """The next item to get: taken items are dropped in bulk (a client that falls behind
        may leave thousands queued, and taking each from the front would move the rest)."""
        self._waiter: asyncio.Future[None] | None = None

    def empty(self) -> bool:
        return self._head == len(self._items)

    def put(self, item: Item | Event) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Item | Event:
        while self.empty():
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, head = self._items, self._head
        item = items[head]
        head += 1
        if head == len(items):
            items.clear()
            head = 0
        elif head >= 64 and 2 * head >= len(items):
            del items[:head]
            head = 0
        self._head = head
        return item


class Follower:
    """An open subscription to one generation's events.

    Events come from the process's `EventHub` through `push`. While the stream's task waits
    for the next live event with nothing queued, `direct` (set by the relay) may send an event
    that is next in sequence straight to the client from the hub's reader: no queue, no task
    switch, no await per token. Everything else (a gap, the end, a client that is not keeping
    up, a ping) goes through the queue and the task, as before.
    """

    def __init__(self, redis: Redis, completion_id: str, keepalive: float) -> None:
        self._redis = redis
        self._log = keys.gen_log(completion_id)
        self._queue = _Inbox()
        # Silence is noticed by one timer per follower, not one per token: every half
        # interval it checks whether anything arrived since its last look, and if not it
        # queues SILENCE. A ping thus follows between half and one interval of silence.
        self._period = keepalive / 2
        self._received = 0
        self._seen_at_tick = 0
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0
        """The seq of the last event sent to the client."""
        self._parked = False
        self.direct: DirectWrite | None = None

    def push(self, item: Item) -> None:
        if self._parked and self.direct is not None and isinstance(item, bytes):
            plain = plain_delta(item) if self._queue.empty() else None
            if plain is not None and plain[0] == self._last + 1:
                try:
                    sent = self.direct.text(*plain)
                except Exception:  # noqa: BLE001 - the task sends it, and meets the error itself
                    sent = False
                if sent:
                    self._received += 1
                    self._last = plain[0]
                    return
            event = Event.from_json(item)
            if event.seq == self._last + 1 and not event.is_terminal and self._queue.empty():
                try:
                    sent = self.direct(event)
                except Exception:  # noqa: BLE001 - the task sends it, and meets the error itself
                    sent = False
                if sent:
                    self._received += 1
                    self._last = event.seq
                    return
            self._queue.put(event)
            return
        self._queue.put(item)

    def _tick(self) -> None:
        if self._received == self._seen_at_tick:
            self._queue.put(SILENCE)
        self._seen_at_tick = self._received
        self._timer = asyncio.get_running_loop().call_later(self._period, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _logged(self, start: int, stop: int = -1) -> list[Event]:
        try:
            raw = await cast(Awaitable[list[bytes]], self._redis.lrange(self._log, start, stop))
        except Exception as exc:
            raise Unavailable("HAIA lost its connection to Redis; try again shortly.") from exc
        return [Event.from_json(item) for item in raw]

    async def has_log(self) -> bool:
        """True while the generation's replay log exists in Redis."""
        return bool(await self._redis.exists(self._log))

    async def events(
        self, *, after: int = 0, ended: EndCheck | None = None, fresh: bool = False
    ) -> AsyncGenerator[Event | None, None]:
        """Events with `seq > after`, in order, until the terminal one; `None` while silent.

        The subscription is already open, so replaying the log first and then dropping live
        events the replay covered loses nothing whatever the timing. While silent, `ended` is
        asked every few keep-alive intervals whether the generation ended without its `end`
        reaching this stream (an expired or damaged log): its answer ends the stream, so
        keep-alive comments never hold a connection open after the generation is over.

        `fresh`: the subscription was confirmed before the generation existed (a turn this
        request has just enqueued), so every event arrives live and there is no log to replay
        first (a gap is still filled from the log).
        """
        self._last = after
        silent = 0
        # The whole log: its end event tells whether `after` is already past the end.
        logged = [] if fresh else await self._logged(0)
        batch: list[Event] | None = [e for e in logged if e.seq > after or e.is_terminal]
        while True:
            if batch is None:
                yield None
                silent += 1
                if ended is not None and silent % STALE_CHECK_EVERY == 0:
                    end = await ended(self._last)
                    if end is not None:
                        # The row is written after the log: what the log has now comes first.
                        batch = await self._logged(self._last) or [end]
                        continue
            else:
                silent = 0
            for event in batch or ():
                if event.is_terminal and event.seq <= self._last:
                    return  # resumed at or past the end: nothing more to send
                if event.seq != self._last + 1:
                    continue
                self._last = event.seq
                yield event
                if event.is_terminal:
                    return
            batch = await self._next_live()

    async def _next_live(self) -> list[Event] | None:
        """The next live events after the last one sent (with any gap filled from the log),
        or None."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._period, self._tick)
        while True:
            self._parked = True
            try:
                item = await self._queue.get()
            finally:
                self._parked = False
            last = self._last  # events sent directly meanwhile moved it
            if isinstance(item, Silence):
                if self._received != self._seen_at_tick:
                    continue  # a stale tick: events arrived since it was queued
                # Silence: also the moment to catch up on anything the live channel missed
                # (a hub reconnect, an unsubscribe racing a resubscribe).
                return await self._logged(last) or None
            self._received += 1
            if isinstance(item, Exception):
                raise Unavailable("HAIA lost its connection to Redis; try again shortly.")
            event = item if isinstance(item, Event) else Event.from_json(item)
            if event.seq <= last and not event.is_terminal:
                continue
            missing = await self._logged(last, event.seq - 2) if event.seq > last + 1 else []
            return [*missing, event]


class Relay:
    """Opens followers for the web's streams, all over the process's one `EventHub`."""

    def __init__(self, redis: Redis, hub: EventHub, *, keepalive: float) -> None:
        self._redis = redis
        self._hub = hub
        self._keepalive = keepalive

    @asynccontextmanager
    async def follow(self, completion_id: str) -> AsyncIterator[Follower]:
        follower = Follower(self._redis, completion_id, self._keepalive)
        try:
            async with self._hub.subscribe(keys.gen_channel(completion_id), follower):
                yield follower
        finally:
            follower.close()
