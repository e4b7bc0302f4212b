"""The event hub and relay against a real Redis: confirmed subscriptions, no gap, no repeat."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from app import keys
from app.errors import Unavailable
from app.events import Event, EventType, plain_delta
from app.hub import SILENCE, EventHub, Item
from app.publish import Ttls, append
from app.relay import Relay, _Inbox
from app.sse import ChunkWriter
from tests.conftest import REDIS_URL


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def hub(redis: aioredis.Redis) -> AsyncIterator[EventHub]:
    event_hub = EventHub(redis)
    await event_hub.start()
    await asyncio.sleep(0.05)
    yield event_hub
    await event_hub.stop()


class Emitter:
    """Appends events one at a time, as run 1 of the generation."""

    def __init__(self, redis: aioredis.Redis, completion_id: str) -> None:
        self._redis = redis
        self._completion_id = completion_id

    async def emit(self, type_: EventType, **fields: Any) -> int:
        event = Event(seq=0, type=type_, **fields)
        return await append(self._redis, self._completion_id, 1, Ttls(60, 60), [event])


def publisher(redis: aioredis.Redis, completion_id: str) -> Emitter:
    return Emitter(redis, completion_id)


async def collect(relay: Relay, completion_id: str, after: int = 0) -> list[Event]:
    async with relay.follow(completion_id) as follower:
        return [e async for e in follower.events(after=after) if e is not None]


class Inbox:
    """A listener that keeps what the hub hands it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Item] = asyncio.Queue()

    def push(self, item: Item) -> None:
        self.queue.put_nowait(item)


async def test_subscribe_is_confirmed_before_it_returns(
    redis: aioredis.Redis, hub: EventHub
) -> None:
    channel = f"haia:test:{uuid.uuid4().hex}"
    inbox = Inbox()
    async with hub.subscribe(channel, inbox):
        # Redis counts the subscriber already: a publish right now cannot be missed.
        assert await redis.publish(channel, b"x") == 1
        assert await asyncio.wait_for(inbox.queue.get(), 2) == b"x"


async def test_one_connection_fans_out_to_every_listener(
    redis: aioredis.Redis, hub: EventHub
) -> None:
    channel = f"haia:test:{uuid.uuid4().hex}"
    first, second = Inbox(), Inbox()
    async with hub.subscribe(channel, first), hub.subscribe(channel, second):
        assert await redis.publish(channel, b"y") == 1  # one Redis subscriber for both
        assert await asyncio.wait_for(first.queue.get(), 2) == b"y"
        assert await asyncio.wait_for(second.queue.get(), 2) == b"y"
    for _ in range(100):  # unsubscribed when the last one left (with that tick's others)
        if await redis.publish(channel, b"z") == 0:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("still subscribed after the last listener left")


async def test_a_lost_connection_fails_its_streams_and_the_hub_comes_back(
    redis: aioredis.Redis, hub: EventHub
) -> None:
    """Redis drops the hub's connection: every listener hears of it (its stream ends with an
    error instead of waiting forever), and the hub reconnects for the streams that follow."""
    channel = f"haia:test:{uuid.uuid4().hex}"
    inbox = Inbox()
    async with hub.subscribe(channel, inbox):
        name = hub._own_channel
        clients = await redis.client_list(_type="pubsub")
        killed = [c["id"] for c in clients if c["name"] == name]
        assert len(killed) == 1, clients  # the hub's connection, named after it
        await redis.client_kill_filter(_id=killed[0])
        assert isinstance(await asyncio.wait_for(inbox.queue.get(), 2), Exception)
    again = Inbox()
    for _ in range(100):
        if hub.connected:
            try:
                async with hub.subscribe(channel, again):
                    assert await redis.publish(channel, b"back") == 1
                    assert await asyncio.wait_for(again.queue.get(), 2) == b"back"
                break
            except Unavailable:
                pass  # the old connection's loss not seen yet
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the hub did not reconnect")


async def test_a_refused_subscription_fails_at_once_and_the_others_go_on(
    redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis refuses a SUBSCRIBE (an ACL that allows only some channels): its waiter fails with
    Redis's reason instead of waiting for the subscribe timeout, and the connection, whose
    replies are still counted right, goes on serving the channels it may use. The same user
    may not name its connection (`CLIENT SETNAME`): that refusal is only logged."""
    user = f"haia-test-{uuid.uuid4().hex[:8]}"
    await redis.acl_setuser(
        user,
        enabled=True,
        nopass=True,
        reset_channels=True,
        channels=["haia:ok:*", "haia:web:*"],  # and the hub's own channel
        keys=["*"],
        categories=["+@all"],
        commands=["-client"],
    )
    limited = aioredis.Redis.from_url(REDIS_URL, username=user, password="x")
    limited_hub = EventHub(limited)
    await limited_hub.start()
    try:
        for _ in range(100):
            if limited_hub.connected:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(Unavailable) as refused:
            async with limited_hub.subscribe(f"haia:no:{uuid.uuid4().hex}", Inbox()):
                pass
        assert isinstance(refused.value.__cause__, ConnectionError)  # not the timeout's
        assert "NOPERM" in str(refused.value.__cause__)
        channel = f"haia:ok:{uuid.uuid4().hex}"
        inbox = Inbox()
        async with limited_hub.subscribe(channel, inbox):
            assert await redis.publish(channel, b"allowed") == 1
            assert await asyncio.wait_for(inbox.queue.get(), 2) == b"allowed"
        assert "Redis refused CLIENT on the pub/sub connection" in caplog.text
        assert "refused the hub's own channel" not in caplog.text
    finally:
        await limited_hub.stop()
        await limited.aclose()
        await redis.acl_deluser(user)


async def test_a_subscriber_that_leaves_before_its_confirmation_leaves_nothing_behind(
    redis: aioredis.Redis, hub: EventHub
) -> None:
    """A stream whose client goes away while its subscription is being confirmed is
    cancelled there: the hub forgets its listener and Redis ends up without the channel."""
    channel = f"haia:test:{uuid.uuid4().hex}"
    entered = asyncio.Event()

    async def stream() -> None:
        async with hub.subscribe(channel, Inbox()):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(stream())
    await asyncio.sleep(0)  # it has asked for the channel and waits for the confirmation
    assert not entered.is_set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert channel.encode() not in hub._listeners
    assert channel.encode() not in hub._confirmed
    for _ in range(200):
        [(_, subscribers)] = await redis.pubsub_numsub(channel)
        if subscribers == 0 and not hub._link._sent:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("Redis kept the channel of a stream that left")
    inbox = Inbox()  # and the channel can be taken again
    async with hub.subscribe(channel, inbox):
        assert await redis.publish(channel, b"again") == 1
        assert await asyncio.wait_for(inbox.queue.get(), 2) == b"again"


async def test_replies_split_anywhere_are_read_whole(redis: aioredis.Redis, hub: EventHub) -> None:
    """Messages of every size, many per read and split across reads, arrive whole and in
    order (the reply parser keeps what a read left unfinished)."""
    channel = f"haia:test:{uuid.uuid4().hex}"
    inbox = Inbox()
    sent = [(b"%d:" % i) + b"x" * (i * 97 % 70_000) for i in range(300)]
    async with hub.subscribe(channel, inbox):
        pipe = redis.pipeline(transaction=False)
        for data in sent:
            pipe.publish(channel, data)
        await pipe.execute()
        got = [await asyncio.wait_for(inbox.queue.get(), 5) for _ in sent]
    assert got == sent


async def _produce_with_pauses(pub: Emitter) -> None:
    """60 deltas, plain ones with quotes and a backslash, every tenth a reasoning one."""
    await pub.emit("start", status="in_progress")
    for i in range(60):
        if i % 10 == 5:
            await pub.emit("delta", reasoning=f"r{i}")  # not plain: decoded first
        else:
            await pub.emit("delta", text=f't{i} "q", \\')
        if i % 7 == 0:
            await asyncio.sleep(0.005)  # the task parks between some of them
    await pub.emit("end", status="completed", finish_reason="stop")


@pytest.mark.parametrize("keeps_up", [True, False], ids=["keeps-up", "falls-behind-at-times"])
async def test_direct_sends_and_the_task_together_deliver_every_event_once_in_order(
    redis: aioredis.Redis, hub: EventHub, keeps_up: bool
) -> None:
    """Live events next in sequence go out from the hub's reader while the stream's task
    waits; the rest (the end, and whatever the client is not ready for) through the task."""
    completion_id = f"chatcmpl-test{uuid.uuid4().hex}"
    relay = Relay(redis, hub, keepalive=5)
    pub = publisher(redis, completion_id)
    sent: list[tuple[str, int]] = []
    texts: dict[int, str] = {}

    class Direct:
        @staticmethod
        def __call__(event: Event) -> bool:
            # Refused: e.g. the client's socket buffer is full: the task sends it.
            ready = keeps_up or event.seq % 3 != 0
            if ready:
                sent.append(("direct", event.seq))
            return ready

        def text(self, seq: int, text: bytes) -> bool:
            texts[seq] = json.loads(text)  # a plain delta's text, still a JSON string
            if seq % 5 == 0:
                return False  # as when the encoder cannot splice it: decoded, then sent
            return self(Event(seq=seq, type="delta"))

    async with relay.follow(completion_id) as follower:
        follower.direct = Direct()
        producer = asyncio.create_task(_produce_with_pauses(pub))
        async for event in follower.events(fresh=True):
            if event is not None:
                sent.append(("task", event.seq))
        await producer
    assert [seq for _, seq in sent] == list(range(1, 63))
    assert sent[-1] == ("task", 62)  # the end always goes through the task
    assert any(how == "direct" for how, _ in sent)
    assert texts and all(text == f't{seq - 2} "q", \\' for seq, text in texts.items())
    if not keeps_up:
        assert sum(how == "task" for how, _ in sent) > 2


async def test_live_events_in_order(redis: aioredis.Redis, hub: EventHub) -> None:
    completion_id = f"chatcmpl-test{uuid.uuid4().hex}"
    relay = Relay(redis, hub, keepalive=5)
    pub = publisher(redis, completion_id)

    async def produce() -> None:
        await pub.emit("start", status="in_progress")
        for i in range(50):
            await pub.emit("delta", text=f"t{i}")
        await pub.emit("end", status="completed", finish_reason="stop")

    async with relay.follow(completion_id) as follower:
        producer = asyncio.create_task(produce())
        events = [e async for e in follower.events() if e is not None]
        await producer
    assert [e.seq for e in events] == list(range(1, 53))
    assert "".join(e.text for e in events) == "".join(f"t{i}" for i in range(50))
    assert events[-1].is_terminal


async def test_resume_at_random_offsets_while_tokens_flow(
    redis: aioredis.Redis, hub: EventHub
) -> None:
    """Followers join at every offset mid-stream: each gets exactly the events after it."""
    completion_id = f"chatcmpl-test{uuid.uuid4().hex}"
    relay = Relay(redis, hub, keepalive=5)
    pub = publisher(redis, completion_id)
    total = 120
    followers: list[asyncio.Task[list[Event]]] = []

    await pub.emit("start", status="in_progress")
    for i in range(total):
        await pub.emit("delta", text=f"{i},")
        if i % 7 == 0:
            followers.append(asyncio.create_task(collect(relay, completion_id, after=i // 2)))
            await asyncio.sleep(0)
    await pub.emit("end", status="completed")
    results = await asyncio.wait_for(asyncio.gather(*followers), 10)
    for index, events in enumerate(results):
        after = (index * 7) // 2
        assert [e.seq for e in events] == list(range(after + 1, total + 3)), index


async def test_a_finished_generation_replays_from_the_log(
    redis: aioredis.Redis, hub: EventHub
) -> None:
    completion_id = f"chatcmpl-test{uuid.uuid4().hex}"
    pub = publisher(redis, completion_id)
    await pub.emit("start", status="in_progress")
    await pub.emit("delta", text="a")
    await pub.emit("end", status="completed")
    events = await collect(Relay(redis, hub, keepalive=5), completion_id)
    assert [(e.seq, e.type) for e in events] == [(1, "start"), (2, "delta"), (3, "end")]
    assert 0 < await redis.ttl(keys.gen_log(completion_id)) <= 60


async def test_silence_yields_keepalives(redis: aioredis.Redis, hub: EventHub) -> None:
    completion_id = f"chatcmpl-test{uuid.uuid4().hex}"
    relay = Relay(redis, hub, keepalive=0.05)
    async with relay.follow(completion_id) as follower:
        events = follower.events()
        assert await anext(events) is None
        assert await anext(events) is None
        await events.aclose()


async def test_events_missed_by_the_live_channel_come_from_the_log(
    redis: aioredis.Redis, hub: EventHub
) -> None:
    completion_id = f"chatcmpl-test{uuid.uuid4().hex}"
    relay = Relay(redis, hub, keepalive=0.05)
    pub = publisher(redis, completion_id)
    async with relay.follow(completion_id) as follower:
        events = follower.events()
        await pub.emit("start", status="in_progress")
        assert (await anext(events)).seq == 1  # type: ignore[union-attr]
        # Logged but never published, as when the channel drops a message.
        log_key = keys.gen_log(completion_id)
        pipe = redis.pipeline()
        pipe.rpush(log_key, Event(seq=2, type="delta", text="x").to_json())
        pipe.rpush(log_key, Event(seq=3, type="end", status="completed").to_json())
        await pipe.execute()
        rest = [e async for e in events if e is not None]
    assert [(e.seq, e.type) for e in rest] == [(2, "delta"), (3, "end")]


async def test_a_followers_inbox_keeps_order_through_a_long_backlog() -> None:
    """A client that falls behind leaves thousands of events queued; they come out in order,
    while more arrive, and the inbox waits when it is empty."""
    inbox = _Inbox()
    got: list[Any] = []
    for n in range(3000):
        inbox.put(Event(seq=n + 1, type="delta", text=str(n)))
        if n % 3 == 0:
            got.append(await inbox.get())
    while not inbox.empty():
        got.append(await inbox.get())
    assert [event.seq for event in got] == list(range(1, 3001))
    waiting = asyncio.create_task(inbox.get())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    inbox.put(SILENCE)
    assert await asyncio.wait_for(waiting, 1) is SILENCE


TRICKY = ["tok ", "", 'a", "b', "\\", 'x\\", "y', 'end"', "é😀\n\t", "\u2028", '{"seq": 1}']


@pytest.mark.parametrize("text", TRICKY)
def test_a_plain_delta_spliced_is_the_chunk_decoding_makes(text: str) -> None:
    """The hot path copies the text's JSON from the event into the chunk: the bytes are
    exactly those of decoding the event and encoding the chunk."""
    raw = Event(seq=7, type="delta", text=text).to_json().encode()
    found = plain_delta(raw)
    assert found is not None
    seq, encoded = found
    writer = ChunkWriter(completion_id="chatcmpl-x", created=1, model="m é", include_usage=False)
    assert seq == 7
    assert writer.content_json(encoded, seq) == writer.content(Event.from_json(raw).text, 7)


@pytest.mark.parametrize(
    "event",
    [
        Event(seq=3, type="delta", text="x", reasoning="y"),
        Event(seq=3, type="delta", reasoning='", "'),
        Event(seq=3, type="delta", tool={"index": 0, "arguments": '", "'}),
        Event(seq=3, type="start", status="in_progress", model="m"),
        Event(seq=3, type="end", status="completed", finish_reason="stop"),
    ],
)
def test_other_events_are_not_taken_for_plain_deltas(event: Event) -> None:
    assert plain_delta(event.to_json().encode()) is None
