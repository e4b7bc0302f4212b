"""One Redis pub/sub connection per web process, fanned out to every stream it serves.

The connection is opened by redis-py (address, TLS, password, client name: whatever the URL
says), then read here: its transport is handed to `_Link`, which parses the replies where
their bytes arrive (hiredis) and gives each message to its listeners in the same call. redis-py's
`PubSub.get_message` cost an await, a dict and a few layers of calls per message, and at 500
streams the web reads some 10,000 messages a second.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import hiredis
from redis.asyncio import Redis

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


def _command(*args: str) -> bytes:
    """`args` as a Redis command (RESP)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


Confirmations = dict[bytes, asyncio.Future[None]]


class _Sent:
    """A command written on the link, the replies still owed to it, and the futures its
    subscriptions' confirmations settle. Redis answers a subscribed connection's commands in
    order: SUBSCRIBE and UNSUBSCRIBE with one reply per channel, anything else with one reply;
    an error reply answers the whole command."""

    __slots__ = ("args", "confirms", "owed")

    def __init__(self, args: tuple[str, ...], confirms: Confirmations) -> None:
        self.args = args
        self.confirms = confirms
        subscription = args[0].upper() in ("SUBSCRIBE", "UNSUBSCRIBE")
        self.owed = max(len(args) - 1, 1) if subscription else 1


class _Link(asyncio.Protocol):
    """The hub's subscribed connection: commands written as they are asked for, replies parsed
    as their bytes arrive. A message goes to `on_message` there, one call per message; the
    other replies settle the command they answer (a refusal also goes to `on_error`)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        # The stream writer stays referenced: when it is collected, it closes the transport.
        self._writer = writer
        self._transport: asyncio.WriteTransport = writer.transport
        self._reader = hiredis.Reader()
        self.on_message: Callable[[list[Any]], None] = lambda reply: None
        self.on_error: Callable[[tuple[str, ...], Exception], None] = lambda args, exc: None
        self._sent: deque[_Sent] = deque()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, redis: Redis, *, name: str) -> _Link:
        """A connection redis-py opened from `redis`'s settings (address, TLS, password),
        taken over. It is called `name` in `CLIENT LIST` unless the settings name it."""
        pool: Any = redis.connection_pool
        connection: Any = pool.make_connection()
        await connection.connect()
        writer, stream = connection._writer, connection._reader
        if writer is None or stream is None or stream._buffer:  # nothing may be left unread
            await connection.disconnect()
            raise ConnectionError("the pub/sub connection could not be taken over")
        # The socket is the link's now: redis-py must not close it when it forgets the
        # connection (its `__del__` closes what it still holds).
        connection._writer = connection._reader = None
        link = cls(writer)
        writer.transport.set_protocol(link)
        if not connection.client_name:
            # Named in `CLIENT LIST`; sent here, where a refusal (an ACL without `CLIENT`) is
            # only logged, not a failed connection.
            link.command("CLIENT", "SETNAME", name)
        return link

    def command(self, *args: str, confirms: Confirmations | None = None) -> None:
        """Send `args`; a SUBSCRIBE's `confirms` are settled by its own replies (confirmed, or
        failed if Redis refuses it), not by another command's for the same channel."""
        if self._transport.is_closing():
            raise ConnectionError("the pub/sub connection is closed")
        self._transport.write(_command(*args))
        self._sent.append(_Sent(args, confirms or {}))

    def close(self) -> None:
        self._writer.close()

    # --- asyncio.Protocol ---

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._transport.close()
                self._lose(ConnectionError(f"Redis sent what is not RESP ({exc})"))
                return
            if reply is False:
                return
            if isinstance(reply, list) and reply[0] == b"message":
                self.on_message(reply)
            elif isinstance(reply, Exception):
                self._refused(reply)
            else:  # (un)subscribe confirmations, a command's own reply (`OK`)
                self._answered(reply)

    def _answered(self, reply: Any) -> None:
        """Count a reply to the oldest command still owed one; a subscription's confirmation
        settles its waiters."""
        if not self._sent:
            return
        sent = self._sent[0]
        if isinstance(reply, list) and reply[0] == b"subscribe":
            confirmed = sent.confirms.pop(reply[1], None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
        sent.owed -= 1
        if sent.owed <= 0:
            self._sent.popleft()

    def _refused(self, error: Exception) -> None:
        """An error reply answers the whole of the oldest command still owed a reply."""
        if not self._sent:
            log.warning("the pub/sub connection got an error reply: %s", error)
            return
        sent = self._sent.popleft()
        log.warning("Redis refused %s on the pub/sub connection: %s", sent.args[0], error)
        for waiter in sent.confirms.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"Redis refused the subscription: {error}"))
                waiter.exception()  # retrieved; the waiter sees it through its await
        self.on_error(sent.args, error)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(exc or ConnectionError("Redis closed the pub/sub connection"))

    def _lose(self, exc: BaseException) -> None:
        if not self.lost.done():
            self.lost.set_exception(exc)
            self.lost.exception()  # retrieved: the hub's reader sees it through its await


class EventHub:
    """Subscribes to channels on behalf of many streams over a single connection, handing each
    message to the channel's listeners as it is read.

    `subscribe()` returns only once Redis has confirmed the subscription, so a caller that
    subscribes and *then* enqueues a job cannot miss the job's first events.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._link: _Link | None = None
        self._listeners: dict[bytes, set[Listener]] = {}
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._connected = False
        # SUBSCRIBE and UNSUBSCRIBE of one tick go out as one command each: a stream's own
        # pair was two socket writes per request.
        self._subscribing: set[str] = set()
        self._unsubscribing: set[str] = set()
        self._sending = False
        # A channel of our own keeps the connection subscribed (and readable) at all times.
        self._own_channel = f"{keys.PREFIX}web:{os.getpid()}:{id(self)}"

    @property
    def connected(self) -> bool:
        """True while the hub holds a live subscription, i.e. while streams can be relayed."""
        return self._connected

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._run(), name="haia-event-hub")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._link is not None:
            self._link.close()
            self._link = None

    @asynccontextmanager
    async def subscribe(self, channel: str, listener: Listener) -> AsyncIterator[None]:
        """Give `listener` every message published on `channel` while the context is open."""
        link = self._link
        if link is None or self._reader is None or self._reader.done():
            raise Unavailable("HAIA cannot reach Redis right now; try again shortly.")
        name = channel.encode()
        listeners = self._listeners.setdefault(name, set())
        listeners.add(listener)
        try:
            if name not in self._confirmed:
                self._confirmed[name] = asyncio.get_running_loop().create_future()
                self._request(channel, subscribe=True)
            await asyncio.wait_for(asyncio.shield(self._confirmed[name]), SUBSCRIBE_TIMEOUT)
        except BaseException as exc:  # cancelled too (the client left): nothing stays behind
            if self._discard(name, listener) and self._link is link:
                self._request(channel, subscribe=False)  # in case Redis subscribes it after all
            if isinstance(exc, Exception):
                raise Unavailable("HAIA cannot reach Redis right now; try again shortly.") from exc
            raise
        try:
            yield
        finally:
            if self._discard(name, listener) and self._link is link:
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
        if not self._sending:
            self._sending = True
            asyncio.get_running_loop().call_soon(self._send_requests)

    def _send_requests(self) -> None:
        """Send the requests of this tick (called once the tick's requests have joined in)."""
        self._sending = False
        leaving, self._unsubscribing = self._unsubscribing, set()
        joining, self._subscribing = self._subscribing, set()
        link = self._link
        if link is None:
            return  # no connection: its loss already failed every waiting subscriber
        try:
            if leaving:
                link.command("UNSUBSCRIBE", *leaving)
            if joining:
                confirms = {}
                for channel in joining:
                    future = self._confirmed.get(channel.encode())
                    if future is not None:
                        confirms[channel.encode()] = future
                link.command("SUBSCRIBE", *joining, confirms=confirms)
        except Exception as exc:  # noqa: BLE001 - the reader reconnects; say so to waiters
            for channel in joining:
                future = self._confirmed.get(channel.encode())
                if future is not None and not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved; the waiter sees it through its await

    def _discard(self, channel: bytes, listener: Listener) -> bool:
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
            link = None
            try:
                link = await _Link.open(self._redis, name=self._own_channel)
                link.on_message = self._message
                link.on_error = self._refused
                self._link = link
                link.command("SUBSCRIBE", self._own_channel)
                self._connected = True
                delay = 0.1
                await link.lost
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis went away: fail streams, reconnect
                self._connected = False
                log.warning("event hub lost Redis (%s); reconnecting", type(exc).__name__)
                self._fail_all(exc)
                if link is not None:
                    link.close()
                self._link = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _message(self, reply: list[Any]) -> None:
        """One message of the subscribed connection, to its channel's listeners."""
        for listener in tuple(self._listeners.get(reply[1], ())):
            try:
                listener.push(reply[2])
            except Exception:  # one stream's fault must not stop the others'
                log.exception("a stream could not take an event")

    def _refused(self, args: tuple[str, ...], error: Exception) -> None:
        """Redis refused a command (its waiters are failed already, by the link)."""
        if args == ("SUBSCRIBE", self._own_channel):
            log.error(
                "Redis refused the hub's own channel %s (%s): let HAIA's user subscribe to"
                " haia:* channels",
                self._own_channel,
                error,
            )

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
