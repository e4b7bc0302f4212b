"""A TCP proxy the tests can cut: a database or Redis "going down" as HAIA sees it."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

from tests.procs import free_port


class Proxy:
    """Forwards 127.0.0.1:`port` to `target`; `stop()` drops the listener and every connection."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self._target = target
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.transport.abort()


async def database_behind_proxy(database_url: str) -> tuple[Proxy, str]:
    """A started proxy in front of the PostgreSQL at `database_url`, and the URL through it."""
    real = urlsplit(database_url)
    proxy = Proxy(free_port(), (real.hostname or "127.0.0.1", real.port or 5432))
    await proxy.start()
    return proxy, database_url.replace(f"{real.hostname}:{real.port}", f"127.0.0.1:{proxy.port}")
