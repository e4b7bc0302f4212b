"""Fair sharing of a small model server: at most `HAIA_UPSTREAM_<NAME>_MAX_CONCURRENT`
generations at once on an upstream, across every worker on every host.

A slot is an entry in `haia:upstream:<name>:running` (completion id → worker id); generations
waiting for one sit in `haia:upstream:<name>:waiting`, scored by their arrival at HAIA, so
they get slots in arrival order whichever worker runs them. One Lua script takes a slot only
for the first waiters, and frees the slots and places of workers whose heartbeat expired (a
SIGKILLed worker frees its slot within HAIA_WORKER_DEAD_AFTER) and of generations that ended
while waiting. The reaper frees a dead worker's slots too, so `redis-cli` and `/metrics` show
the truth without waiting for the next taker.
"""

from __future__ import annotations

from collections.abc import Iterable

from redis.asyncio import Redis

from app import keys

_TAKE = """
local running, waiting, waiters = KEYS[1], KEYS[2], KEYS[3]
local id, worker, limit, arrival = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local beat, gen = ARGV[5], ARGV[6]
local function alive(w) return w and redis.call('EXISTS', beat .. w) == 1 end
local function ended(c) return redis.call('GET', gen .. c .. ':fence') == 'end' end
local held = redis.call('HGETALL', running)
for i = 1, #held, 2 do
  if held[i] ~= id and (not alive(held[i + 1]) or ended(held[i])) then
    redis.call('HDEL', running, held[i])
  end
end
if redis.call('HEXISTS', running, id) == 0 then
  redis.call('ZADD', waiting, 'NX', arrival, id)
  redis.call('HSET', waiters, id, worker)
  while true do
    local free = limit - redis.call('HLEN', running)
    if free <= 0 then return 0 end
    local pruned = false
    local granted = false
    for _, other in ipairs(redis.call('ZRANGE', waiting, 0, free - 1)) do
      if other == id then granted = true break end
      if not alive(redis.call('HGET', waiters, other)) or ended(other) then
        redis.call('ZREM', waiting, other)
        redis.call('HDEL', waiters, other)
        pruned = true
      end
    end
    if granted then break end
    if not pruned then return 0 end
  end
end
redis.call('ZREM', waiting, id)
redis.call('HDEL', waiters, id)
redis.call('HSET', running, id, worker)
return 1
"""


class Slots:
    """The slots of every limited upstream, in Redis."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._take = redis.register_script(_TAKE)

    async def take(
        self, upstream: str, *, completion_id: str, worker: str, limit: int, arrival_ms: int
    ) -> bool:
        """Take a slot if one is free for this generation now; else keep its place in line."""
        result = await self._take(
            keys=[
                keys.upstream_running(upstream),
                keys.upstream_waiting(upstream),
                keys.upstream_waiters(upstream),
            ],
            args=[
                completion_id,
                worker,
                limit,
                arrival_ms,
                keys.worker_heartbeat(""),
                keys.gen_channel(""),
            ],
            client=self._redis,
        )
        return bool(result)

    async def release(self, upstreams: Iterable[str], completion_id: str) -> None:
        """Give back the generation's slot, or its place in line, on these upstreams."""
        pipe = self._redis.pipeline(transaction=False)
        for upstream in upstreams:
            pipe.hdel(keys.upstream_running(upstream), completion_id)
            pipe.zrem(keys.upstream_waiting(upstream), completion_id)
            pipe.hdel(keys.upstream_waiters(upstream), completion_id)
        await pipe.execute()

    async def counts(self, upstreams: list[str]) -> dict[str, tuple[int, int]]:
        """(running, waiting) per upstream."""
        if not upstreams:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for upstream in upstreams:
            pipe.hlen(keys.upstream_running(upstream))
            pipe.zcard(keys.upstream_waiting(upstream))
        raw = await pipe.execute()
        return {
            upstream: (int(raw[2 * i]), int(raw[2 * i + 1])) for i, upstream in enumerate(upstreams)
        }
