"""Publishing a generation's events under a fence: one writer, one `end`, numbered by Redis.

Every run of a generation holds a fencing token (its attempt number, also stored in the
database row). Redis keeps the current holder in `haia:gen:{id}:fence`; appending to the replay
log and publishing on the live channel happen in one Lua script that first checks the fence,
so a run that lost its claim (taken for dead, then superseded) can never add a word, and once
an `end` is appended the fence reads `end` and nothing follows it. Sequence numbers are
assigned inside the script from the log's length, so they are gap-free whoever writes.

Deltas are coalesced: whatever a worker's generations produce within one event-loop tick goes
to Redis in one script call covering all of them, so the per-token cost falls as load rises
instead of the number of round trips (and of commands to pack and parse) growing with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis

from app import keys
from app.counters import Counter
from app.events import Event, text_delta_body
from app.script_calls import script_calls

log = logging.getLogger(__name__)

# KEYS: fence, log, channel, in-flight hash. ARGV: token, running ttl, the run's `start`
# event body or '', its in-flight field and entry or ''. Taking the fence, announcing the run
# and listing it in `haia:inflight` are one round trip: each was a socket write of its own.
# Returns the log's length after it (-1: ended, -2: a later run holds it).
_CLAIM = """
local fence = redis.call('GET', KEYS[1])
if fence == 'end' then return -1 end
if fence and tonumber(fence) and tonumber(fence) >= tonumber(ARGV[1]) then return -2 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local n = redis.call('LLEN', KEYS[2])
if ARGV[3] ~= '' then
  n = n + 1
  local data = '{"seq": ' .. n .. ', ' .. string.sub(ARGV[3], 2)
  redis.call('RPUSH', KEYS[2], data)
  redis.call('PUBLISH', KEYS[3], data)
  if n == 1 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[4], ARGV[4], ARGV[5]) end
return n
"""

# Applied with a generation's `end`, in the script that appends it: its `haia:inflight` entry
# goes and its counters are added (a JSON array of [hash, field, amount]; an amount with a `.`
# is a float). An `end` is one round trip, whatever goes with it.
_FINISH = """
local function finish(inflight, id, counters)
  redis.call('HDEL', inflight, id)
  for _, c in ipairs(counters) do
    if string.find(c[3], '.', 1, true) then
      redis.call('HINCRBYFLOAT', c[1], c[2], c[3])
    else
      redis.call('HINCRBY', c[1], c[2], c[3])
    end
  end
end
"""

# KEYS: fence, log, channel, in-flight hash. ARGV: token, running ttl, final ttl, terminal
# (0/1), the generation's id, its counters (JSON, with `end`), bodies…
# A missing fence is accepted (and taken): Redis lost its data, or nobody ever claimed.
_EMIT = (
    _FINISH
    + """
local fence = redis.call('GET', KEYS[1])
if fence == 'end' then return -1 end
if fence and fence ~= ARGV[1] then return -2 end
local n = redis.call('LLEN', KEYS[2])
local first = n
for i = 7, #ARGV do
  n = n + 1
  local data = '{"seq": ' .. n .. ', ' .. string.sub(ARGV[i], 2)
  redis.call('RPUSH', KEYS[2], data)
  redis.call('PUBLISH', KEYS[3], data)
end
if ARGV[4] == '1' then
  redis.call('SET', KEYS[1], 'end', 'EX', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  finish(KEYS[4], ARGV[5], cjson.decode(ARGV[6]))
else
  if not fence then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
  if first == 0 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
end
return n
"""
)


# The batcher's script: many generations' pending deltas, and the ends of those that ended,
# in one call, so the per-command cost of a round trip (packing, parsing, Lua call) is paid
# once per tick, not once per generation. ARGV[1]: a JSON array with, per generation, [fence
# key, log key, channel, token, running ttl, [bodies…], its id, its `haia:inflight` entry or
# "", final ttl (0 unless its last body is its `end`), its counters]; ARGV[2]: the in-flight
# hash. The entry (the token count, every few deltas) is written only while the run holds the
# fence, so an ended generation's entry is never written back. One JSON argument because
# redis-py packs each argument of a command in Python: about 4 µs per generation as separate
# arguments, under 1 µs as JSON that Redis's C cjson decodes. Returns each generation's last
# seq, or -1/-2.
_EMIT_MANY = (
    _FINISH
    + """
local out = {}
for g, item in ipairs(cjson.decode(ARGV[1])) do
  local fence_key, log_key, channel, token, ttl = item[1], item[2], item[3], item[4], item[5]
  local fence = redis.call('GET', fence_key)
  if fence == 'end' then
    out[g] = -1
  elseif fence and fence ~= token then
    out[g] = -2
  else
    local n = redis.call('LLEN', log_key)
    local first = n
    for _, body in ipairs(item[6]) do
      n = n + 1
      local data = '{"seq": ' .. n .. ', ' .. string.sub(body, 2)
      redis.call('RPUSH', log_key, data)
      redis.call('PUBLISH', channel, data)
    end
    if item[9] ~= 0 then
      redis.call('SET', fence_key, 'end', 'EX', item[9])
      redis.call('EXPIRE', log_key, item[9])
      finish(ARGV[2], item[7], item[10])
    else
      if not fence then redis.call('SET', fence_key, token, 'EX', ttl) end
      if first == 0 then redis.call('EXPIRE', log_key, ttl) end
      if item[8] ~= '' then redis.call('HSET', ARGV[2], item[7], item[8]) end
    end
    out[g] = n
  end
end
return out
"""
)


COALESCE = 0.005
"""Seconds a delta may wait after the batcher's last send for others to share its script.

Streams rarely produce two tokens in the same event-loop tick: at 100 streams of 20 tokens/s,
sending each tick's deltas made nearly one script call per token, each a socket write on
both sides of Redis. Waiting up to 5 ms after the previous send groups them (at most 200
calls a second, whatever the load) and adds nothing when deltas are rarer than that. 5 ms
against 2 ms, back to back: 7–20 % less CPU in web and worker per unit of the upstream's own
(`bench/load.py`, 100 and 500 streams), a delay no reader sees (a fast local model's tokens
come 10 ms apart)."""


class Fenced(Exception):
    """This run no longer holds the generation: another run or an `end` took it."""


@dataclass(frozen=True)
class Ttls:
    running: int
    final: int


def _keys(completion_id: str) -> list[str]:
    return [
        keys.gen_fence(completion_id),
        keys.gen_log(completion_id),
        keys.gen_channel(completion_id),
    ]


async def claim(
    redis: Redis,
    completion_id: str,
    token: int,
    ttls: Ttls,
    *,
    start: Event | None = None,
    inflight: str = "",
) -> int:
    """Take the fence for run `token`, and with it append `start` and write the generation's
    `haia:inflight` entry (JSON) when given; returns how many events are logged then.

    Raises `Fenced` when the generation has ended or a later run holds it.
    """
    body = start.body() if start is not None else ""
    calls = script_calls(redis)  # the claims of a burst of starts share one write
    result = int(
        await calls.call(
            calls.script(_CLAIM),
            [*_keys(completion_id), keys.INFLIGHT],
            [token, ttls.running, body, completion_id, inflight],
        )
    )
    if result < 0:
        raise Fenced(completion_id)
    return result


async def append(
    redis: Redis,
    completion_id: str,
    token: int | str,
    ttls: Ttls,
    events: list[Event],
    counters: Sequence[Counter] = (),
) -> int:
    """Append `events` if run `token` holds the fence. When the last is `end`, the
    generation's `haia:inflight` entry goes and `counters` are added in the same script.

    Returns the last sequence number; raises `Fenced` when refused.
    """
    terminal = events[-1].is_terminal if events else False
    bodies = [e.body() for e in events]
    return await _append_bodies(redis, completion_id, token, ttls, bodies, terminal, counters)


async def _append_bodies(
    redis: Redis,
    completion_id: str,
    token: int | str,
    ttls: Ttls,
    bodies: list[str],
    terminal: bool,
    counters: Sequence[Counter],
) -> int:
    """`append`, of the events' bodies (`Event.body`)."""
    calls = script_calls(redis)
    result = int(
        await calls.call(
            calls.script(_EMIT),
            [*_keys(completion_id), keys.INFLIGHT],
            [
                token,
                ttls.running,
                ttls.final,
                "1" if terminal else "0",
                completion_id,
                json.dumps(counters),
                *bodies,
            ],
        )
    )
    if result < 0:
        raise Fenced(completion_id)
    return result


async def fence_of(redis: Redis, completion_id: str) -> str | None:
    raw = await cast(Awaitable[bytes | None], redis.get(keys.gen_fence(completion_id)))
    return raw.decode() if raw is not None else None


@dataclass
class _Ending:
    """An `end` waiting for the batcher, with what goes with it; `sent` resolves True once
    appended, False when the fence refused it."""

    event: Event
    counters: list[Counter]
    sent: asyncio.Future[bool]


@dataclass(eq=False)
class Publisher:
    """One run's events for one generation. `delta()` is buffered; `start()`/`end()` flush.

    Deltas wait in `pending` until the process's `Batcher` sends them (same tick, one round
    trip for all generations), and so does the `end`; if Redis is away they stay pending and
    go out, in order, when it is back. `fenced` turns true when Redis refused this run: it must
    stop.
    """

    redis: Redis
    completion_id: str
    token: int
    ttls: Ttls
    batcher: Batcher | None = None
    pending: list[str] = field(default_factory=list)
    """The bodies (`Event.body`) of the events not sent yet."""
    fenced: bool = False
    ending: _Ending | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _progress: str = ""

    async def start(self, model: str | None = None) -> None:
        """Announce the run (again before a fallback model answers), naming its model."""
        await self._send([Event(seq=0, type="start", status="in_progress", model=model)])

    def progress(self, entry: str) -> None:
        """Its `haia:inflight` entry (JSON), written with the next batch of deltas."""
        self._progress = entry

    def take_progress(self) -> str:
        entry, self._progress = self._progress, ""
        return entry

    def delta(self, text: str) -> None:
        self.pending.append(text_delta_body(text))
        if self.batcher is not None:
            self.batcher.wake(self)

    def reasoning(self, text: str) -> None:
        self.pending.append(Event(seq=0, type="delta", reasoning=text).body())
        if self.batcher is not None:
            self.batcher.wake(self)

    def tool(self, piece: dict[str, Any]) -> None:
        self.pending.append(Event(seq=0, type="delta", tool=piece).body())
        if self.batcher is not None:
            self.batcher.wake(self)

    async def flush(self) -> None:
        await self._send([])

    async def end(self, event: Event, counters: Sequence[Counter] = ()) -> None:
        """Append whatever is pending and then `event`, the generation's `end`: its
        `haia:inflight` entry goes and `counters` are added with it. Raises `Fenced` if
        refused.

        With a batcher, the `end` goes with the tick's other deltas and ends, and this waits
        until it is sent: while Redis is away the batcher keeps it and retries, so a caller
        that stops waiting leaves it to be announced when Redis is back (called again, it
        waits for the same `end`)."""
        if self.fenced:
            raise Fenced(self.completion_id)
        if self.batcher is None:
            await self._send([event], counters)
            return
        if self.ending is None:
            future = asyncio.get_running_loop().create_future()
            self.ending = _Ending(event, list(counters), future)
            self.batcher.wake(self)
        if not await asyncio.shield(self.ending.sent):
            raise Fenced(self.completion_id)

    async def _send(self, extra: list[Event], counters: Sequence[Counter] = ()) -> None:
        async with self._lock:
            if self.fenced:
                raise Fenced(self.completion_id)
            batch, self.pending = [*self.pending, *(e.body() for e in extra)], []
            if not batch:
                return
            terminal = bool(extra) and extra[-1].is_terminal
            try:
                await _append_bodies(
                    self.redis, self.completion_id, self.token, self.ttls, batch, terminal, counters
                )
            except Fenced:
                self.fenced = True
                raise
            except BaseException:
                # Not sent (Redis away, or cancelled mid-call): keep the deltas, in order; the
                # caller retries its own start or end.
                self.pending[:0] = batch[: len(batch) - len(extra)]
                raise

    def _refused(self) -> None:
        """Redis refused this run (fenced): nothing it holds will be sent."""
        self.fenced = True
        self.pending = []
        if self.ending is not None and not self.ending.sent.done():
            self.ending.sent.set_result(False)


class Batcher:
    """Sends every publisher's pending deltas and ends, once per event-loop tick, in one
    script call."""

    def __init__(self, redis: Redis, *, coalesce: float = COALESCE) -> None:
        self._redis = redis
        self.coalesce = coalesce
        self._dirty: dict[int, Publisher] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="haia-publish-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def wake(self, publisher: Publisher) -> None:
        self._dirty[id(publisher)] = publisher
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.05
        sent_at = 0.0
        while True:
            await self._wake.wait()
            # A delta that comes after a quiet spell goes at once; under load, deltas wait up
            # to `COALESCE` after the last send, so that one script carries all of them.
            wait = sent_at + self.coalesce - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            sent_at = loop.time()
            self._wake.clear()
            dirty, self._dirty = list(self._dirty.values()), {}
            try:
                await self._flush(dirty)
                delay = 0.05
            except Exception as exc:  # noqa: BLE001 - Redis away: keep the deltas, retry
                log.warning("publishing deltas failed (%s); retrying", type(exc).__name__)
                for publisher in dirty:
                    if (publisher.pending or publisher.ending) and not publisher.fenced:
                        self._dirty[id(publisher)] = publisher
                self._wake.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _flush(self, dirty: list[Publisher]) -> None:
        ready: list[Publisher] = []
        for publisher in dirty:
            if publisher.fenced:
                publisher._refused()
                continue
            if not publisher.pending and publisher.ending is None:
                continue
            if publisher._lock.locked():
                self._dirty[id(publisher)] = publisher  # its start/flush is sending: next turn
                self._wake.set()
                continue
            await publisher._lock.acquire()  # free: returns at once, no other task runs
            ready.append(publisher)
        if not ready:
            return
        try:
            await self._send(ready)
        finally:
            for publisher in ready:
                publisher._lock.release()

    async def _send(self, ready: list[Publisher]) -> None:
        batches = [publisher.pending for publisher in ready]
        endings = [publisher.ending for publisher in ready]
        progress = [publisher.take_progress() for publisher in ready]
        for publisher in ready:
            publisher.pending = []
        payload = json.dumps(
            [
                [
                    *_keys(p.completion_id),
                    str(p.token),
                    p.ttls.running,
                    b if end is None else [*b, end.event.body()],
                    p.completion_id,
                    entry,
                    0 if end is None else p.ttls.final,
                    [] if end is None else end.counters,
                ]
                for p, b, end, entry in zip(ready, batches, endings, progress, strict=True)
            ],
            separators=(",", ":"),
            ensure_ascii=False,
        )
        calls = script_calls(self._redis)  # EVALSHA, loading the script again if Redis lost it
        try:
            results = await calls.call(calls.script(_EMIT_MANY), [], [payload, keys.INFLIGHT])
        except BaseException:
            # Not sent: the deltas go back in front, the ends stay where they are.
            for publisher, batch, entry in zip(ready, batches, progress, strict=True):
                publisher.pending[:0] = batch
                publisher.progress(publisher.take_progress() or entry)  # a newer one wins
            raise
        for publisher, end, result in zip(ready, endings, results, strict=True):
            if int(result) < 0:
                publisher._refused()
            elif end is not None:
                publisher.ending = None
                if not end.sent.done():
                    end.sent.set_result(True)
