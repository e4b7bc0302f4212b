"""Redis script calls that go out together: every call made while the previous batch is on
the wire (or in the same event-loop tick) is sent with the next one, as one pipeline.

At a few hundred requests arriving at once, each call of a script was its own socket write,
its own read wake-up and its own connection checkout, on a process whose event loop is the
bottleneck. Batched, a burst costs one write and one read per batch, and a lone call still
goes out at once (no timer: a batch waits only for the one before it).

Each call keeps its own result or error, as if it had been sent alone; calls are applied in
the order they were made. A call whose caller gave up (cancelled) is still sent if it was
already in a batch, exactly as an awaited command already written to the socket would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

log = logging.getLogger(__name__)

Arg = str | bytes | int | float


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: Sequence[Arg]
    args: Sequence[Arg]
    done: asyncio.Future[Any]


class ScriptCalls:
    """Sends the script calls of one process in batches (one pipeline each)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pending: list[_Call] = []
        self._sending: asyncio.Task[None] | None = None
        self._scripts: dict[str, AsyncScript] = {}

    def script(self, source: str) -> AsyncScript:
        """`source` registered on this client (once)."""
        found = self._scripts.get(source)
        if found is None:
            found = self._scripts[source] = self._redis.register_script(source)
        return found

    async def call(self, script: AsyncScript, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """Run `script` with `keys` and `args`; its result, or the error Redis raised."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Call(script, keys, args, done))
        if self._sending is None or self._sending.get_loop() is not done.get_loop():
            self._sending = asyncio.ensure_future(self._send_all())
        return await done

    async def _send_all(self) -> None:
        try:
            await asyncio.sleep(0)  # the calls made in this tick go with the first one
            while self._pending:
                batch, self._pending = self._pending, []
                await self._send(batch)
        finally:
            self._sending = None
            if self._pending:  # cancelled while calls waited (shutdown): fail them
                _settle(self._pending, RuntimeError("script calls stopped"))
                self._pending = []

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._pipeline(batch)
            missing = [
                (call, i) for i, call in enumerate(batch) if isinstance(results[i], NoScriptError)
            ]
            if missing:  # Redis restarted (or flushed its scripts): load them, send again
                for source in {call.script.script for call, _ in missing}:
                    await self._redis.script_load(source)
                again = await self._pipeline([call for call, _ in missing])
                for (_, i), result in zip(missing, again, strict=True):
                    results[i] = result
        except asyncio.CancelledError:
            _settle(batch, asyncio.CancelledError())
            raise
        except Exception as exc:  # noqa: BLE001 - Redis away: every caller gets the error
            _settle(batch, exc)
            return
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

    async def close(self) -> None:
        task = self._sending
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _settle(batch: list[_Call], error: BaseException) -> None:
    for call in batch:
        if call.done.done():
            continue
        if isinstance(error, asyncio.CancelledError):
            call.done.cancel()
        else:
            call.done.set_exception(error)


_BY_CLIENT: dict[int, ScriptCalls] = {}


def script_calls(redis: Redis) -> ScriptCalls:
    """The batcher of `redis`'s script calls (one per client)."""
    found = _BY_CLIENT.get(id(redis))
    if found is None or found._redis is not redis:
        found = _BY_CLIENT[id(redis)] = ScriptCalls(redis)
    return found
