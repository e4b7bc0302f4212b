"""HAIA's HTTP/1.1 client: POST a JSON body and read an SSE answer, or GET a small JSON body.

Why not aiohttp for this: profiled at 500 streams, reading the upstream's SSE through aiohttp
was a quarter of the worker's CPU. Each chunk went through its C parser into a `StreamReader`,
woke the generation's task, and rescheduled a read-timeout timer. Here the bytes are parsed
where they arrive, in the protocol's `data_received`: the chunked framing, the SSE lines, and
each `data:` line handed to a callback in the same call. No task runs per chunk, and one timer
per connection checks for silence.

What it speaks: HTTP/1.1 over TCP or TLS, `Content-Length`, chunked or close-delimited bodies,
gzip or deflate content encodings (it asks for none), and keep-alive. An idle connection is
reused by the next request to the same origin, and a request whose reused connection turns out
closed is sent again once on a new one. Proxies are not its business: `workers.openai_wire`
sends proxied requests through aiohttp.

The web asks upstreams for their model lists with `get`, so it needs no other HTTP client
(httpx cost the web process about 6 MB of memory for those few GETs a minute).
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit

MAX_HEAD = 64 * 1024
"""Bytes of status line and headers accepted before the answer is refused as malformed."""
MAX_ERROR_BODY = 256 * 1024
"""Bytes of a non-200 body kept for its error message."""
MAX_BODY = 16 * 1024 * 1024
"""Bytes of a whole answer `get` accepts (a model list is a few kilobytes)."""
MAX_IDLE_PER_ORIGIN = 1024
"""Idle connections kept per server: a burst of streams reuses them on the next burst."""
MAX_IDLE_AGE = 4.0
"""Seconds an idle connection is reused within. Servers close theirs after a few seconds
(uvicorn after 5), and a NAT may forget a quiet flow without a word: an older one is closed
rather than tried."""


class ProtocolError(Exception):
    """The server's answer is not valid HTTP/1.1 (or uses an encoding this client lacks)."""


class ConnectionClosed(Exception):
    """The connection closed before the answer was complete."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@dataclass
class Answer:
    """A finished request: the status and headers, and for a status other than 200 the body."""

    status: int
    headers: dict[str, str]
    body: bytes = b""


OnData = Callable[[bytes], bool]
"""Called with each SSE `data:` field; returns True when the stream is over (`[DONE]`)."""


class TooLarge(ProtocolError):
    """A whole answer longer than `MAX_BODY`."""


_SIZE, _DATA, _DATA_END, _TRAILER, _IDENTITY, _UNTIL_CLOSE, _COMPLETE = range(7)


@dataclass(eq=False)
class _Connection(asyncio.Protocol):
    """One connection; one request at a time."""

    origin: Origin
    read_timeout: float
    on_idle: Callable[[_Connection], None]
    transport: asyncio.Transport | None = None
    closed: bool = False
    _head: bytearray = field(default_factory=bytearray)
    _buffer: bytearray = field(default_factory=bytearray)
    _state: int = _SIZE
    _left: int = 0
    _lines: bytes = b""
    _decoder: Any = None
    _on_data: OnData | None = None
    _answer: Answer | None = None
    _headers_seen: bool = False
    _got_bytes: bool = False
    _keep_alive: bool = True
    _over: bool = False
    """The SSE stream said `[DONE]` (the body may still be finishing)."""
    _finished: asyncio.Future[Answer] | None = None
    _released: bool = False
    _timer: asyncio.TimerHandle | None = None
    _last: float = 0.0
    idle_since: float = 0.0
    """When it went back to the pool (the loop's clock)."""

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        if self._finished is None or self._finished.done():
            return
        if self._headers_seen and self._state == _UNTIL_CLOSE:
            self._flush_lines()
            self._complete()
            return
        self._fail(ConnectionClosed("the connection closed before the answer was complete"))

    def data_received(self, data: bytes) -> None:
        if self._finished is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        self._got_bytes = True
        self._last = asyncio.get_running_loop().time()
        try:
            if not self._headers_seen:
                data = self._read_head(data)
                if not self._headers_seen:
                    return
            if data:
                self._read_body(data)
        except Exception as exc:  # noqa: BLE001 - the callback's or the parser's: the caller's
            self._fail(exc)

    # --- one request ---

    def start(self, head: bytes, body: bytes, on_data: OnData | None) -> asyncio.Future[Answer]:
        """Send `head` and `body`; a 200 answer's SSE `data:` fields go to `on_data`, or, without
        one, its whole body is kept in the `Answer`."""
        loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        self._on_data = on_data
        self._head.clear()
        self._buffer.clear()
        self._lines = b""
        self._decoder = None
        self._answer = None
        self._headers_seen = self._got_bytes = self._over = self._released = False
        self._state = _SIZE
        self._last = loop.time()
        self._timer = loop.call_later(self.read_timeout, self._check_silence)
        assert self.transport is not None
        # Head and body as they are: joined, a long conversation's body would be copied once
        # more, and kept for as long as the answer streams.
        self.transport.writelines((head, body))
        return self._finished

    @property
    def answered(self) -> bool:
        """Whether any byte of the answer arrived (a request that got none may be resent)."""
        return self._got_bytes

    def release(self) -> None:
        """The caller is done with this request: keep the connection if its answer is complete
        (or once it completes), else close it."""
        self._released = True
        if self._state == _COMPLETE and self._keep_alive and not self.closed:
            self._to_pool()
        elif not self._over:
            self.close()
        elif self._timer is None and not self.closed:
            # `[DONE]` came before the body's end: wait for it (then the connection is
            # reused), but not past a silent read timeout.
            self._last = asyncio.get_running_loop().time()
            self._timer = asyncio.get_running_loop().call_later(
                self.read_timeout, self._check_silence
            )

    def close(self) -> None:
        self._stop_timer()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    # --- parsing ---

    def _read_head(self, data: bytes) -> bytes:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                raise ProtocolError("the answer's headers are too long")
            return b""
        lines = bytes(self._head[:end]).decode("latin-1").split("\r\n")
        rest = bytes(self._head[end + 4 :])
        version, _, status_text = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise ProtocolError("the answer is not HTTP/1.x")
        status = int(status_text.split(" ", 1)[0])
        if 100 <= status < 200:  # an interim answer: the real one follows
            self._head = bytearray(rest)
            return self._read_head(b"") if rest else b""
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        self._answer = Answer(status=status, headers=headers)
        self._headers_seen = True
        self._framing(version, headers)
        return rest

    def _framing(self, version: str, headers: dict[str, str]) -> None:
        """How the body is encoded and where it ends, from the answer's headers."""
        connection = headers.get("connection", "").lower()
        self._keep_alive = version == "HTTP/1.1" and "close" not in connection
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding == "gzip":
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        elif encoding not in ("identity", ""):
            raise ProtocolError(f"the answer's content encoding {encoding!r} is not supported")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = _SIZE
        elif "content-length" in headers:
            self._left = int(headers["content-length"])
            self._state = _IDENTITY
            if self._left == 0:
                self._body_end()
        else:
            self._state, self._keep_alive = _UNTIL_CLOSE, False

    def _read_body(self, data: bytes) -> None:
        if self._state == _IDENTITY:
            piece = data[: self._left]
            self._left -= len(piece)
            self._payload(piece)
            if self._left == 0:
                self._body_end()
        elif self._state == _UNTIL_CLOSE:
            self._payload(data)
        elif self._state == _COMPLETE:
            self._keep_alive = False  # bytes after the end: do not reuse this connection
        elif self._buffer:  # an unfinished piece of framing from an earlier read
            self._buffer += data
            pos = self._chunks(bytes(self._buffer))
            del self._buffer[:pos]
        else:
            pos = self._chunks(data)
            if pos < len(data):
                self._buffer += data[pos:]

    def _chunks(self, data: bytes) -> int:
        """Read the chunked framing of `data` as far as it goes; how many bytes were used
        (the rest waits for more). A server streaming an answer sends each event as a chunk
        of its own, so one read is usually one whole chunk: parsed here in one pass, without
        copying it into a buffer first."""
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(end - pos, self._left)
                self._payload(data[pos : pos + take])
                self._left -= take
                pos += take
                if self._left == 0:
                    self._state = _DATA_END
            elif state == _DATA_END:
                if end - pos < 2:
                    break
                self._state = _SIZE
                pos += 2
            elif state == _COMPLETE:
                break
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > MAX_HEAD:
                        raise ProtocolError("the answer's chunked framing is broken")
                    break
                self._framing_line(data[pos:eol])
                pos = eol + 2
        return pos

    def _framing_line(self, line: bytes) -> None:
        """A chunk's size line, or a line of the trailers after the last chunk."""
        if self._state == _SIZE:
            size = _chunk_size(line)
            if size == 0:
                self._state = _TRAILER
            else:
                self._left, self._state = size, _DATA
        elif not line:  # the empty line after the trailers
            self._body_end()

    def _payload(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error as exc:
                raise ProtocolError("the answer's compressed body is broken") from exc
        answer = self._answer
        assert answer is not None
        if answer.status != 200:
            if len(answer.body) < MAX_ERROR_BODY:
                answer.body += data[: MAX_ERROR_BODY - len(answer.body)]
            return
        if self._on_data is None:  # a whole body
            if len(answer.body) + len(data) > MAX_BODY:
                raise TooLarge(f"the answer is longer than {MAX_BODY} bytes")
            answer.body += data
            return
        if self._over or not data:
            return
        lines = self._lines + data
        if b"\n" not in data:
            self._lines = lines
            return
        *complete, self._lines = lines.split(b"\n")
        self._deliver(complete)

    def _flush_lines(self) -> None:
        if self._lines and not self._over:
            last, self._lines = self._lines, b""
            self._deliver([last])

    def _deliver(self, lines: list[bytes]) -> None:
        on_data = self._on_data
        assert on_data is not None
        for line in lines:
            if line.startswith(b"data:") and on_data(line[5:].strip()):
                self._over = True
                self._complete()
                return

    def _body_end(self) -> None:
        self._flush_lines()
        self._state = _COMPLETE
        self._complete()
        if self._released and self._keep_alive and not self.closed:
            self._to_pool()

    # --- endings ---

    def _complete(self) -> None:
        self._stop_timer()
        finished = self._finished
        if finished is not None and not finished.done():
            assert self._answer is not None
            finished.set_result(self._answer)

    def _fail(self, exc: BaseException) -> None:
        self.close()
        finished = self._finished
        if finished is not None and not finished.done():
            finished.set_exception(exc)

    def _to_pool(self) -> None:
        self._finished = None
        self._on_data = None
        self._stop_timer()
        self.idle_since = asyncio.get_running_loop().time()
        self.on_idle(self)

    def _check_silence(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        silent = loop.time() - self._last
        if silent >= self.read_timeout:
            self._fail(TimeoutError("the server sent nothing for too long"))
        else:
            self._timer = loop.call_later(self.read_timeout - silent, self._check_silence)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


_HEX_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


def _chunk_size(line: bytes) -> int:
    """The size of a chunk, from its size line (extensions after `;` ignored): hex digits only
    (`int` would also take a sign, `0x` or underscores, and a negative size would move the
    parser backwards)."""
    size = line.split(b";", 1)[0].strip()
    if not _HEX_SIZE.fullmatch(size):
        raise ProtocolError("the answer's chunked framing is broken")
    return int(size, 16)


class SSEClient:
    """POSTs JSON and reads SSE answers, keeping idle connections per origin."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: dict[Origin, list[_Connection]] = {}
        self._ssl = ssl_context
        """For https: the system's trusted certificates unless given."""

    async def post(self, url: str, body: bytes, headers: dict[str, str], on_data: OnData) -> Answer:
        """POST `body` to `url`; each SSE `data:` field of a 200 answer goes to `on_data`.

        Returns once `on_data` says the stream is over or the body ends; any other status
        returns with its body. Raises `ConnectionError`/`OSError` when the server cannot be
        reached, `TimeoutError` when it stays silent, `ConnectionClosed` or `ProtocolError`
        when the answer breaks off or is malformed, and whatever `on_data` raises."""
        return await self._send("POST", url, body, headers, on_data)

    async def get(self, url: str, headers: dict[str, str]) -> Answer:
        """GET `url`; the answer with its whole body (at most `MAX_BODY` bytes), whatever its
        status. Raises as `post` does."""
        return await self._send("GET", url, None, headers, None)

    async def _send(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: dict[str, str],
        on_data: OnData | None,
    ) -> Answer:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        origin = Origin(scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if parts.username is not None and not any(k.lower() == "authorization" for k in headers):
            # `https://user:password@host/v1`: Basic authentication, as other clients send it.
            user = unquote(parts.username)
            password = unquote(parts.password or "")
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers = {**headers, "Authorization": f"Basic {basic}"}
        if any("\r" in line or "\n" in line for line in map("".join, headers.items())):
            # A line break would end the header early and smuggle in another (a stray
            # newline at the end of an API key in a file is the usual cause).
            raise ValueError("a request header contains a line break")
        head = [
            f"{method} {target} HTTP/1.1",
            f"Host: {origin.host_header}",
            *(
                ("Content-Type: application/json", f"Content-Length: {len(body)}")
                if body is not None
                else ("Accept: application/json",)
            ),
            "Accept-Encoding: identity",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        request_head = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        for reused in (True, False):
            connection = self._take_idle(origin) if reused else None
            if reused and connection is None:
                continue
            if connection is None:
                connection = await self._open(origin)
            try:
                return await connection.start(request_head, body or b"", on_data)
            except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
                if reused and not connection.answered:
                    continue  # the server had closed the idle connection: send it anew
                raise
            finally:
                connection.release()
        raise AssertionError("unreachable")

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        # The oldest are first: close those idle too long, then take the newest.
        oldest = asyncio.get_running_loop().time() - MAX_IDLE_AGE
        stale = next((i for i, c in enumerate(idle) if c.idle_since >= oldest), len(idle))
        for connection in idle[:stale]:
            connection.close()
        del idle[:stale]
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        return None

    def _back(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.origin, [])
        if len(idle) < MAX_IDLE_PER_ORIGIN:
            idle.append(connection)
        else:
            connection.close()

    async def _open(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        _, protocol = await asyncio.wait_for(
            loop.create_connection(
                lambda: _Connection(origin, self._read_timeout, self._back),
                origin.host,
                origin.port,
                ssl=tls,
                server_hostname=origin.host if tls is not None else None,
            ),
            self._connect_timeout,
        )
        return protocol


@lru_cache(maxsize=64)
def proxy_for(url: str) -> str | None:
    """The proxy of HTTP_PROXY / HTTPS_PROXY / NO_PROXY for `url`, or None."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.netloc):
        return None
    return urllib.request.getproxies_environment().get(parts.scheme)
