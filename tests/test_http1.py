"""HAIA's streaming HTTP client (`app/http1.py`) against a real socket server that sends
exactly the bytes each test scripts: framings, splits at every byte, reuse, and every way an
answer can break off."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.http1 import ConnectionClosed, ProtocolError, SSEClient, TooLarge


@dataclass
class Server:
    """Answers each request with the bytes `answer(n)` gives for the n-th request (0-based);
    `split` writes them one byte at a time; `close_after` closes the connection after that
    many answers on it."""

    answers: list[bytes] = field(default_factory=list)
    split: bool = False
    close_after: int | None = None
    connections: int = 0
    bodies: list[bytes] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    url: str = ""

    async def close(self, listener: asyncio.Server) -> None:
        """Close the server's side of every connection, so no handler outlives the test."""
        listener.close()
        for writer in self.writers:
            writer.close()
        await asyncio.sleep(0.05)  # the handlers see the close and return
        await listener.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head.decode("latin-1"))
                length = 0
                for line in head.decode("latin-1").split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                self.bodies.append(await reader.readexactly(length))
                answer = self.answers[min(len(self.bodies) - 1, len(self.answers) - 1)]
                if self.split:
                    for i in range(len(answer)):
                        writer.write(answer[i : i + 1])
                        await writer.drain()
                else:
                    writer.write(answer)
                    await writer.drain()
                served += 1
                if self.close_after is not None and served >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client (or the test's end) closed the connection
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    listener = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    state.url = f"http://127.0.0.1:{port}/v1/chat/completions"
    yield state
    await state.close(listener)


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def sse(*texts: str) -> list[bytes]:
    events = [b"data: " + json.dumps({"t": text}).encode() + b"\n\n" for text in texts]
    return [*events, b"data: [DONE]\n\n"]


HEAD_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


class Collect:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, data: bytes) -> bool:
        if data == b"[DONE]":
            return True
        self.texts.append(json.loads(data)["t"])
        return False


async def post(client: SSEClient, server: Server, collect: Collect) -> int:
    answer = await client.post(
        server.url, b'{"model":"m"}', {"Accept": "text/event-stream"}, collect
    )
    return answer.status


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
async def test_chunked_sse_split_anywhere_arrives_whole(server: Server, split: bool) -> None:
    server.split = split
    server.answers = [HEAD_CHUNKED + chunked(*sse("a", "b c", "é\n"))]
    client = SSEClient(connect_timeout=5, read_timeout=5)
    collect = Collect()
    assert await post(client, server, collect) == 200
    assert collect.texts == ["a", "b c", "é\n"]
    assert server.bodies == [b'{"model":"m"}']
    client.close()


async def test_content_length_close_delimited_crlf_and_interim_answers(server: Server) -> None:
    body = b"".join(sse("x", "y")).replace(b"\n", b"\r\n")
    server.answers = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body),
    ]
    client = SSEClient(connect_timeout=5, read_timeout=5)
    collect = Collect()
    assert await post(client, server, collect) == 200
    assert collect.texts == ["x", "y"]
    client.close()

    server.answers = [b"HTTP/1.0 200 OK\r\n\r\n" + b"data: " + json.dumps({"t": "z"}).encode()]
    server.close_after = 1
    collect = Collect()
    assert await post(SSEClient(connect_timeout=5, read_timeout=5), server, collect) == 200
    assert collect.texts == ["z"]  # the last line had no newline: the close ended it


async def test_gzip_bodies_are_decoded(server: Server) -> None:
    body = gzip.compress(b"".join(sse("zipped", "too")))
    server.answers = [
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    ]
    collect = Collect()
    assert await post(SSEClient(connect_timeout=5, read_timeout=5), server, collect) == 200
    assert collect.texts == ["zipped", "too"]


async def test_an_idle_connection_is_reused_and_a_closed_one_replaced(server: Server) -> None:
    server.answers = [HEAD_CHUNKED + chunked(*sse("one"))]
    client = SSEClient(connect_timeout=5, read_timeout=5)
    for _ in range(3):
        collect = Collect()
        assert await post(client, server, collect) == 200
        assert collect.texts == ["one"]
        await asyncio.sleep(0.01)  # the last chunk reaches the client after [DONE]
    assert server.connections == 1
    # The server closes each connection after one answer: the next request finds its idle
    # connection closed (or closing) and is sent again on a new one, transparently.
    server.close_after = 1
    for _ in range(3):
        collect = Collect()
        assert await post(client, server, collect) == 200
        assert collect.texts == ["one"]
    assert len(server.bodies) >= 6  # a resend on a new connection may add one
    client.close()


async def test_an_error_status_returns_its_body(server: Server) -> None:
    error = json.dumps({"error": {"message": "no such model", "code": "model_not_found"}})
    server.answers = [
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nRetry-After: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked(error.encode()[:10], error.encode()[10:])
    ]
    answer = await SSEClient(connect_timeout=5, read_timeout=5).post(
        server.url, b"{}", {}, Collect()
    )
    assert answer.status == 404
    assert json.loads(answer.body) == json.loads(error)
    assert answer.headers["retry-after"] == "3"


async def test_a_cut_stream_raises_connection_closed(server: Server) -> None:
    server.answers = [HEAD_CHUNKED + chunked(*sse("half"))[:40]]
    server.close_after = 1
    collect = Collect()
    with pytest.raises(ConnectionClosed):
        await post(SSEClient(connect_timeout=5, read_timeout=5), server, collect)


async def test_silence_raises_timeout(server: Server) -> None:
    server.answers = [HEAD_CHUNKED + b"5\r\ndata:"]  # then nothing, connection open
    with pytest.raises(TimeoutError):
        await post(SSEClient(connect_timeout=5, read_timeout=0.3), server, Collect())


@pytest.mark.parametrize("size", [b"zz", b"-6", b"+5", b"0x10", b"1_0", b""])
async def test_broken_framing_raises_protocol_error(server: Server, size: bytes) -> None:
    """Only hex digits make a chunk size (`-6` once moved the parser backwards, forever)."""
    server.answers = [HEAD_CHUNKED + size + b"\r\ndata: x\r\n"]
    with pytest.raises(ProtocolError):
        await post(SSEClient(connect_timeout=5, read_timeout=5), server, Collect())


async def test_what_the_callback_raises_reaches_the_caller(server: Server) -> None:
    server.answers = [HEAD_CHUNKED + chunked(*sse("a", "b"))]

    class Stop(Exception):
        pass

    def refuse(data: bytes) -> bool:
        raise Stop

    with pytest.raises(Stop):
        await SSEClient(connect_timeout=5, read_timeout=5).post(server.url, b"{}", {}, refuse)


async def test_an_unreachable_server_raises_os_error() -> None:
    with pytest.raises(ConnectionRefusedError):
        await SSEClient(connect_timeout=5, read_timeout=5).post(
            "http://127.0.0.1:9/v1/chat/completions", b"{}", {}, Collect()
        )


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by the openssl command (a
    Python package for it would bring `cryptography`, which redis-py then imports in every
    HAIA process)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


async def test_https_with_a_verified_certificate_and_a_refused_one(
    certificate: tuple[Path, Path],
) -> None:
    """TLS to the server's name, the certificate checked against the trusted authorities."""
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    state = Server(answers=[HEAD_CHUNKED + chunked(*sse("over", "tls"))])
    listener = await asyncio.start_server(state.handle, "127.0.0.1", 0, ssl=server_context)
    port = listener.sockets[0].getsockname()[1]
    url = f"https://127.0.0.1:{port}/v1/chat/completions"
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        client = SSEClient(connect_timeout=5, read_timeout=5, ssl_context=trusting)
        collect = Collect()
        assert (await client.post(url, b"{}", {}, collect)).status == 200
        assert collect.texts == ["over", "tls"]
        client.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # the system does not trust it
            await SSEClient(connect_timeout=5, read_timeout=5).post(url, b"{}", {}, Collect())
    finally:
        await state.close(listener)


MODELS = json.dumps({"object": "list", "data": [{"id": "llama3.2"}, {"id": "qwen3:8b"}]})


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
async def test_get_returns_the_whole_body_and_keeps_the_connection(
    server: Server, split: bool
) -> None:
    """The web's model list requests: a GET whose whole answer comes back, chunked or with a
    length, and whose connection is reused by the next one."""
    server.split = split
    body = MODELS.encode()
    server.answers = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(body[:7], body[7:]),
    ]
    client = SSEClient(connect_timeout=5, read_timeout=5)
    url = server.url.replace("/chat/completions", "/models")
    for _ in range(2):
        answer = await client.get(url, {"Authorization": "Bearer k"})
        assert (answer.status, json.loads(answer.body)) == (200, json.loads(MODELS))
    assert server.connections == 1
    assert server.bodies == [b"", b""]
    request_line, *headers = server.heads[0].strip().split("\r\n")
    assert request_line == "GET /v1/models HTTP/1.1"
    assert "Authorization: Bearer k" in headers
    assert not any(h.lower().startswith("content-length") for h in headers)
    client.close()


async def test_get_keeps_an_error_answers_body_and_refuses_a_huge_one(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.answers = [b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 12\r\n\r\nbad key here"]
    client = SSEClient(connect_timeout=5, read_timeout=5)
    answer = await client.get(server.url, {})
    assert (answer.status, answer.body) == (401, b"bad key here")
    client.close()

    monkeypatch.setattr("app.http1.MAX_BODY", 10)
    server.answers = [HEAD_CHUNKED + chunked(b"0123456789", b"a")]
    with pytest.raises(TooLarge):
        await SSEClient(connect_timeout=5, read_timeout=5).get(server.url, {})


async def test_a_broken_compressed_body_is_a_protocol_error(server: Server) -> None:
    """Not gzip although it says so: a `ProtocolError` (never zlib's own error, which no
    caller expects), on a GET as on a streamed POST."""
    server.answers = [
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!"
    ]
    with pytest.raises(ProtocolError, match="compressed"):
        await SSEClient(connect_timeout=5, read_timeout=5).get(server.url, {})
    with pytest.raises(ProtocolError, match="compressed"):
        await post(SSEClient(connect_timeout=5, read_timeout=5), server, Collect())


async def test_user_and_password_in_the_url_are_sent_as_basic_auth(server: Server) -> None:
    server.answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"]
    client = SSEClient(connect_timeout=5, read_timeout=5)
    url = server.url.replace("http://", "http://me:s%40cret@")
    assert (await client.get(url, {})).status == 200
    assert "Authorization: Basic bWU6c0BjcmV0" in server.heads[0]  # me:s@cret
    assert "me:" not in server.heads[0].split("\r\n")[1]  # the Host header has no userinfo
    # The caller's own Authorization wins.
    assert (await client.get(url, {"Authorization": "Bearer k"})).status == 200
    assert "Authorization: Bearer k" in server.heads[1] and "Basic" not in server.heads[1]
    client.close()


async def test_a_header_with_a_line_break_is_refused_before_sending(server: Server) -> None:
    client = SSEClient(connect_timeout=5, read_timeout=5)
    with pytest.raises(ValueError, match="line break"):
        await client.get(server.url, {"Authorization": "Bearer key\r\nX-Evil: 1"})
    assert server.connections == 0


async def test_an_idle_connection_kept_too_long_is_not_reused(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server or a NAT may have dropped it without a word: a fresh one is opened."""
    monkeypatch.setattr("app.http1.MAX_IDLE_AGE", 0.2)
    server.answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"]
    client = SSEClient(connect_timeout=5, read_timeout=5)
    for _ in range(2):
        assert (await client.get(server.url, {})).status == 200
    assert server.connections == 1  # reused while fresh
    await asyncio.sleep(0.3)
    assert (await client.get(server.url, {})).status == 200
    assert server.connections == 2
    client.close()
