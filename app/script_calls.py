"""Redis script calls that go out together: the calls made in one event-loop tick, or while
every sender is busy, are sent as one pipeline.

At a few hundred requests arriving at once, each call of a script was its own socket write,
its own read wake-up and its own connection checkout, on a process whose event loop is the
bottleneck. Batched, a burst costs one write and one read per batch, and a lone call still
goes out at the next turn of the event loop (no timer).

Each call keeps its own result or error, as if it had been sent alone. Up to `IN_FLIGHT`
batches are on the wire at once, each on its own pooled connection, so a connection that
stalls holds up its own batch, not every later call. A call whose caller gave up (cancelled)
before its batch went out is not sent; once sent, it runs, as an awaited command already
written to the socket would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Arg = str | bytes | int | float

IN_FLIGHT = 4
"""Batches one client may have on the wire at once."""


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: Sequence[Arg]
    args: Sequence[Arg]
    done: asyncio.Future[Any]


class ScriptCalls:
    """Sends the script calls of one Redis client in batches (one pipeline each)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._scripts: dict[str, AsyncScript] = {}
        self._pending: list[_Call] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    def script(self, source: str) -> AsyncScript:
        """`source` registered on this client (once)."""
        found = self._scripts.get(source)
        if found is None:
            found = self._scripts[source] = self._redis.register_script(source)
        return found

    async def call(self, script: AsyncScript, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """Run `script` with `keys` and `args`; its result, or the error Redis raised."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests): nothing of the old one carries
            self._loop, self._pending, self._scheduled, self._sending = loop, [], False, set()
        done: asyncio.Future[Any] = loop.create_future()
        self._pending.append(_Call(script, keys, args, done))
        self._schedule()
        return await done

    def _schedule(self) -> None:
        if not self._scheduled and self._pending and len(self._sending) < IN_FLIGHT:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start_batch)

    def _start_batch(self) -> None:
        self._scheduled = False
        batch = [call for call in self._pending if not call.done.done()]  # not given up
        self._pending = []
        if not batch:
            return
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(lambda done: self._sent(done, batch))

    def _sent(self, task: asyncio.Task[None], batch: list[_Call]) -> None:
        self._sending.discard(task)
        _settle(batch, asyncio.CancelledError())  # only if the task never ran (cancelled)
        self._schedule()  # what was called meanwhile

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._pipeline(batch)
        except Exception as exc:  # noqa: BLE001 - Redis away: every caller gets the error
            _settle(batch, exc)
            return
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:  # Redis restarted (or flushed its scripts): load them, send those again
            again = [batch[i] for i in missing]
            try:
                for source in {call.script.script for call in again}:
                    await self._redis.script_load(source)
                for i, result in zip(missing, await self._pipeline(again), strict=True):
                    results[i] = result
            except Exception as exc:  # noqa: BLE001 - only those calls failed; the rest ran
                for i in missing:
                    results[i] = exc
        for call, result in zip(batch, results, strict=True):
            if call.done.done():
                continue
            if isinstance(result, Exception):
                call.done.set_exception(result)
            else:
                call.done.set_result(result)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for call in batch:
            # EVALSHA straight away: a Script in a pipeline asks SCRIPT EXISTS first.
            pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
        return list(await pipe.execute(raise_on_error=False))


def _settle(batch: list[_Call], error: BaseException) -> None:
    for call in batch:
        if call.done.done():
            continue
        if isinstance(error, asyncio.CancelledError):
            call.done.cancel()
        else:
            call.done.set_exception(error)


def script_calls(redis: Redis) -> ScriptCalls:
    """The batcher of `redis`'s script calls: one per client, kept on it (gone with it)."""
    found: ScriptCalls | None = getattr(redis, "_haia_script_calls", None)
    if found is None:
        found = ScriptCalls(redis)
        redis._haia_script_calls = found  # type: ignore[attr-defined]
    return found
