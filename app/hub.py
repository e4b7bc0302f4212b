"""One Redis pub/sub connection per web process, fanned out to every stream it serves."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from app import keys
from app.errors import Unavailable

log = logging.getLogger(__name__)


class Silence:
    """Queued by a follower's own timer when nothing arrived for a while."""


SILENCE = Silence()
Item = bytes | Exception | Silence
SUBSCRIBE_TIMEOUT = 5.0


class Listener(Protocol):
    def push(self, item: Item) -> None:
        """Take one message (or the error that ended the subscription), synchronously: it is
        called from the hub's reader, which must not wait."""
        ...


class EventHub:
    """Subscribes to channels on behalf of many streams over a single connection, handing each
    message to the channel's listeners as it is read.

    `subscribe()` returns only once Redis has confirmed the subscription, so a caller that
    subscribes and *then* enqueues a job cannot miss the job's first events.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pubsub: PubSub | None = None
        self._listeners: dict[str, set[Listener]] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._connected = False
        # SUBSCRIBE and UNSUBSCRIBE of one tick go out as one command each: a stream's own
        # pair was two socket writes per request.
        self._subscribing: set[str] = set()
        self._unsubscribing: set[str] = set()
        self._sender: asyncio.Task[None] | None = None
        # A channel of our own keeps the connection subscribed (and readable) at all times.
        self._own_channel = f"{keys.PREFIX}web:{os.getpid()}:{id(self)}"

    @property
    def connected(self) -> bool:
        """True while the hub holds a live subscription, i.e. while streams can be relayed."""
        return self._connected

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._run(), name="haia-event-hub")

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    @asynccontextmanager
    async def subscribe(self, channel: str, listener: Listener) -> AsyncIterator[None]:
        """Give `listener` every message published on `channel` while the context is open."""
        pubsub = self._pubsub
        if pubsub is None or self._reader is None or self._reader.done():
            raise Unavailable("HAIA cannot reach Redis right now; try again shortly.")
        listeners = self._listeners.setdefault(channel, set())
        listeners.add(listener)
        try:
            if channel not in self._confirmed:
                self._confirmed[channel] = asyncio.get_running_loop().create_future()
                self._request(channel, subscribe=True)
            await asyncio.wait_for(asyncio.shield(self._confirmed[channel]), SUBSCRIBE_TIMEOUT)
        except Exception as exc:
            self._discard(channel, listener)
            raise Unavailable("HAIA cannot reach Redis right now; try again shortly.") from exc
        try:
            yield
        finally:
            if self._discard(channel, listener) and self._pubsub is pubsub:
                # If the connection is gone there is nothing to undo.
                self._request(channel, subscribe=False)

    def _request(self, channel: str, *, subscribe: bool) -> None:
        """Subscribe to `channel` or leave it, with the other requests of this tick. The last
        request for a channel wins (a Redis reply confirms each subscription)."""
        if subscribe:
            self._unsubscribing.discard(channel)
            self._subscribing.add(channel)
        else:
            self._subscribing.discard(channel)
            self._unsubscribing.add(channel)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_requests(), name="haia-hub-requests")

    async def _send_requests(self) -> None:
        await asyncio.sleep(0)  # the requests of this tick join in
        while self._subscribing or self._unsubscribing:
            pubsub = self._pubsub
            leaving, self._unsubscribing = self._unsubscribing, set()
            joining, self._subscribing = self._subscribing, set()
            if pubsub is None:
                return  # no connection: its loss already failed every waiting subscriber
            try:
                if leaving:
                    await pubsub.unsubscribe(*leaving)
                if joining:
                    await pubsub.subscribe(*joining)
            except Exception as exc:  # noqa: BLE001 - the reader reconnects; say so to waiters
                for channel in joining:
                    future = self._confirmed.get(channel)
                    if future is not None and not future.done():
                        future.set_exception(exc)
                        future.exception()  # retrieved; the waiter sees it through its await
                return

    def _discard(self, channel: str, listener: Listener) -> bool:
        """Forget `listener`; True when it was the channel's last."""
        listeners = self._listeners.get(channel)
        if listeners is None:
            return False
        listeners.discard(listener)
        if listeners:
            return False
        del self._listeners[channel]
        future = self._confirmed.pop(channel, None)
        if future is not None and not future.done():
            future.cancel()
        return True

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                self._pubsub = self._redis.pubsub()
                await self._pubsub.subscribe(self._own_channel)
                self._connected = True
                delay = 0.1
                await self._read(self._pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis went away: fail streams, reconnect
                self._connected = False
                log.warning("event hub lost Redis (%s); reconnecting", type(exc).__name__)
                self._fail_all(exc)
                if self._pubsub is not None:
                    await asyncio.gather(
                        self._pubsub.aclose(),  # type: ignore[no-untyped-call]
                        return_exceptions=True,
                    )
                    self._pubsub = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _read(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind, channel = message["type"], message["channel"]
            name = channel.decode() if isinstance(channel, bytes) else str(channel)
            if kind == "message":
                for listener in tuple(self._listeners.get(name, ())):
                    try:
                        listener.push(message["data"])
                    except Exception:  # one stream's fault must not stop the others'
                        log.exception("a stream could not take an event")
            elif kind == "subscribe":
                future = self._confirmed.get(name)
                if future is not None and not future.done():
                    future.set_result(None)

    def _fail_all(self, exc: Exception) -> None:
        for listeners in self._listeners.values():
            for listener in listeners:
                listener.push(exc)
        for future in self._confirmed.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here; waiters see it through their own await
        self._listeners.clear()
        self._confirmed.clear()
        self._subscribing.clear()
        self._unsubscribing.clear()
