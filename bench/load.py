"""Load benchmark: concurrent streams straight to the upstream, then through HAIA.

One run, one process tree: the fake upstream (`tests/fake_upstream.py`) is started, every level
is streamed straight to it, then web and worker are started from the `Procfile` (as the tests
start them) and every level is streamed through HAIA. A level of N opens N streams at once, each
asking for `--tokens` tokens paced at `--rate` tokens/s, and waits for all of them (at most
`--level-timeout` seconds). Then it prints one table per level. No assertions: the numbers are
the result; the web, worker and upstream logs stay in the temporary directory it names.

    uv run python bench/load.py [--levels 1,10,100,500,1000] [--tokens 40] [--rate 20] [--workers 1]
                                [--database-url postgres://…] [--redis-url redis://…/14]
                                [--api chat,responses] [--history 20] [--stored 100000]

`--stored N` first fills the database with N messages (conversations of ten, a few hundred
bytes each), as a HAIA that has served a homelab for a while holds: what every turn reads must
not grow with it.

`--history N` makes every request resend N earlier messages of about 1 KB each, as OpenWebUI
resends the conversation with each turn (each stream is still a new conversation, so HAIA
stores them all): what a long chat costs in memory and time.

`--api` picks what goes through HAIA: `chat` (`POST /v1/chat/completions`, the default),
`responses` (`POST /v1/responses` with `stream: true`), or both: then each level streams both,
one after the other on the same web and worker, and the table has a row for each next to direct.

An answer is *whole* when it is HTTP 200, carries exactly the expected text, has no error chunk,
and ends with `data: [DONE]` after a chunk with a `finish_reason` (on `/v1/responses`: after
`response.completed`; `response.failed`, `response.incomplete` and `error` events count as
error chunks). Everything else is counted by
kind. The client is a bare HTTP/1.1 + SSE reader on uvloop (no HTTP library per chunk), so it
costs little next to what it measures; its own CPU seconds are printed with the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shlex
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

import httpx
import redis
import uvloop

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/load.py` puts bench/ on the path, not the root
    sys.path.insert(0, str(ROOT))

from app import keys  # noqa: E402
from tests.procs import Proc, Stack, free_port, spawn, wait_until  # noqa: E402

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY = 0.05
PSS_EVERY = 5
"""Polls between two PSS samples (0.25 s)."""
DRAIN_TIMEOUT = 120.0


# --- one stream ---------------------------------------------------------------------------


@dataclass
class Result:
    """What one stream received."""

    start: float = 0.0
    ttft: float | None = None
    status: int | None = None
    http_code: str = ""
    error_code: str | None = None
    finished: bool = False
    done: bool = False
    done_after_finish: bool = False
    bad_chunk: bool = False
    conn_error: str | None = None
    timed_out: bool = False
    parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def on_data(self, data: bytes) -> None:
        """One SSE `data:` payload."""
        if data == b"[DONE]":
            self.done = True
            self.done_after_finish = self.finished
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self.bad_chunk = True
            return
        kind = chunk.get("type")
        if kind is not None:
            self.on_response_event(kind, chunk)
            return
        if "error" in chunk:
            error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            self.error_code = str(error.get("code") or error.get("type") or "unknown")
            return
        for choice in chunk.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                if self.ttft is None:
                    self.ttft = time.perf_counter() - self.start
                self.parts.append(content)
            if choice.get("finish_reason"):
                self.finished = True

    def on_response_event(self, kind: str, event: dict[str, Any]) -> None:
        """One Responses API event."""
        if kind == "response.output_text.delta":
            if self.ttft is None:
                self.ttft = time.perf_counter() - self.start
            self.parts.append(event["delta"])
        elif kind == "response.completed":
            self.finished = True
        elif kind in ("response.failed", "response.incomplete", "error"):
            error = event.get("error") or (event.get("response") or {}).get("error") or {}
            self.error_code = str(error.get("code") or event.get("code") or kind)

    def on_error_body(self, body: bytes) -> None:
        try:
            error = json.loads(body).get("error") or {}
            self.http_code = str(error.get("code") or error.get("type") or "")
        except (ValueError, AttributeError):
            self.http_code = "non-JSON body"


def outcome(result: Result, expected: str) -> str | None:
    """None for a whole answer, else the kind of failure."""
    if result.conn_error is not None:
        return f"connection error ({result.conn_error})"
    if result.status is None:
        return "timeout" if result.timed_out else "no response"
    if result.status != 200:
        return f"HTTP {result.status} {result.http_code}".rstrip()
    if result.error_code is not None:
        return f"error chunk {result.error_code}"
    if result.bad_chunk:
        return "unparsable chunk"
    if result.timed_out:
        return "timeout"
    if not result.done:
        return "cut (no [DONE])"
    if not result.done_after_finish:
        return "[DONE] without finish chunk (response.completed)"
    if result.text != expected:
        short = expected.startswith(result.text)
        return "truncated text, no error" if short else "wrong text, no error"
    return None


class SseClient(asyncio.Protocol):
    """Reads one HTTP/1.1 response: a chunked SSE stream, or an error body."""

    def __init__(self, request: bytes, result: Result, finished: asyncio.Future[None]) -> None:
        self.request = request
        self.result = result
        self.finished = finished
        self.transport: asyncio.BaseTransport | None = None
        self.head = bytearray()
        self.in_body = False
        self.chunked = False
        self.raw = bytearray()
        self.chunk_left = -1  # >0: data bytes left; -1: size line next; -2: CRLF next
        self.events = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        cast(asyncio.WriteTransport, transport).write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(bytes(self.head[:end]))
            data = bytes(self.head[end + 4 :])
            self.in_body = True
        if self.result.status != 200:
            self.raw += data
        elif self.chunked:
            self.raw += data
            self._dechunk()
        else:
            self._feed_sse(data)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.result.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True

    def _dechunk(self) -> None:
        raw, pos = self.raw, 0
        while pos < len(raw) and not self.finished.done():
            if self.chunk_left > 0:
                take = min(self.chunk_left, len(raw) - pos)
                self._feed_sse(bytes(raw[pos : pos + take]))
                pos += take
                self.chunk_left -= take
                if self.chunk_left == 0:
                    self.chunk_left = -2
            elif self.chunk_left == -2:
                if len(raw) - pos < 2:
                    break
                pos += 2
                self.chunk_left = -1
            else:
                line_end = raw.find(b"\r\n", pos)
                if line_end < 0:
                    break
                size = int(bytes(raw[pos:line_end]).split(b";")[0], 16)
                pos = line_end + 2
                if size == 0:
                    self._end()
                    break
                self.chunk_left = size
        del raw[:pos]

    def _feed_sse(self, data: bytes) -> None:
        self.events += data
        while not self.finished.done():
            end = self.events.find(b"\n\n")
            if end < 0:
                return
            event = bytes(self.events[:end])
            del self.events[: end + 2]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self.result.on_data(line[5:].strip())
            if self.result.done:
                self._end()

    def _end(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.result.status not in (None, 200):
            self.result.on_error_body(bytes(self.raw))
        elif exc is not None and not self.result.done:
            self.result.conn_error = type(exc).__name__
        if not self.finished.done():
            self.finished.set_result(None)


APIS = {"chat": "HAIA", "responses": "HAIA responses"}  # --api value: the row's name


@dataclass(frozen=True)
class Target:
    """Where the streams go, and through which API."""

    name: str
    host: str
    port: int
    model: str
    api: str = "chat"
    history: int = 0
    """Earlier messages each request resends (as OpenWebUI resends the conversation)."""

    def request(self, prompt: str) -> bytes:
        messages = [*_history(self.history, uuid.uuid4().hex), {"role": "user", "content": prompt}]
        if self.api == "responses":
            path = "/v1/responses"
            payload: dict[str, object] = {"model": self.model, "stream": True, "input": prompt}
            if self.history:
                payload["input"] = messages
        else:
            path = "/v1/chat/completions"
            payload = {"model": self.model, "stream": True, "messages": messages}
        body = json.dumps(payload).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        return head.encode() + body


HISTORY_TEXT = "Earlier in this conversation: " + "a homelab question and its answer. " * 28
"""About 1 KB: one earlier message of `--history`."""


def _history(count: int, chat: str) -> list[dict[str, str]]:
    """`count` earlier messages of a conversation of its own (`chat` makes it unique: a
    history HAIA has stored before would continue, or branch, that conversation instead)."""
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": f"{chat} {i}. {HISTORY_TEXT}"} for i in range(count)]


async def one_stream(target: Target, prompt: str, result: Result) -> None:
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    result.start = time.perf_counter()
    request = target.request(prompt)
    try:
        transport, _ = await loop.create_connection(
            lambda: SseClient(request, result, finished), target.host, target.port
        )
    except OSError as exc:
        result.conn_error = type(exc).__name__
        return
    except asyncio.CancelledError:
        result.timed_out = True
        raise
    try:
        await finished
    except asyncio.CancelledError:
        result.timed_out = True
        raise
    finally:
        transport.close()


# --- processes: peak RSS and CPU seconds ---------------------------------------------------


def _status_kb(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    """Proportional set size: private pages, plus shared ones divided among their users. Web
    and worker map the same libraries (Python, OpenSSL, SQLite, …); adding their RSS counts
    those pages twice, adding their PSS once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def reset_peak(pid: int) -> bool:
    """Reset VmHWM (Linux ≥ 4.0): the peak then covers this level only."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Usage:
    peak_rss_mb: float
    cpu_s: float
    peak_pss_mb: float = float("nan")


class Sampler:
    """Peak RSS (VmHWM reset at the start, and VmRSS polled every 50 ms) and CPU seconds of
    some processes over one level, and the peak PSS of web and worker together (every 0.25 s)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak_kb = dict.fromkeys(pids, 0)
        self.together = [name for name in pids if name.startswith(("web", "worker"))]
        self.peak_pss_kb = 0  # of web and worker together, at one instant
        self.hwm_reset: dict[str, bool] = {}
        self.cpu_start: dict[str, float] = {}
        self.cpu_self = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        polls = 0
        while not self._stop.wait(SAMPLE_EVERY):
            for name, pid in self.pids.items():
                self.peak_kb[name] = max(self.peak_kb[name], _status_kb(pid, "VmRSS:"))
            polls += 1
            if polls % PSS_EVERY == 0:  # the kernel walks every page for it: not too often
                self._sample_pss()

    def _sample_pss(self) -> None:
        if self.together:
            pss = sum(_pss_kb(self.pids[name]) for name in self.together)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)

    def __enter__(self) -> Sampler:
        for name, pid in self.pids.items():
            self.hwm_reset[name] = reset_peak(pid)
            self.peak_kb[name] = _status_kb(pid, "VmRSS:")
            self.cpu_start[name] = cpu_seconds(pid)
        self._sample_pss()
        self.cpu_self = time.process_time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_self = time.process_time() - self.cpu_self
        for name, pid in self.pids.items():
            if self.hwm_reset[name]:
                self.peak_kb[name] = max(self.peak_kb[name], _status_kb(pid, "VmHWM:"))

    def usage(self) -> dict[str, Usage]:
        found = {
            name: Usage(self.peak_kb[name] / 1024, cpu_seconds(pid) - self.cpu_start[name])
            for name, pid in self.pids.items()
        }
        found["client"] = Usage(float("nan"), self.cpu_self)
        if self.together:
            found["web+worker"] = Usage(float("nan"), float("nan"), self.peak_pss_kb / 1024)
        return found


# --- one level ------------------------------------------------------------------------------


@dataclass
class Level:
    target: str
    streams: int
    results: list[Result]
    wall: float
    usage: dict[str, Usage]
    expected: str
    undrained: str = ""

    def outcomes(self) -> Counter[str]:
        kinds = (outcome(r, self.expected) for r in self.results)
        return Counter(kind for kind in kinds if kind is not None)

    def whole(self) -> int:
        return sum(1 for r in self.results if outcome(r, self.expected) is None)

    def ttfts(self) -> list[float]:
        return [r.ttft for r in self.results if r.ttft is not None]

    def tokens_per_s(self) -> float:
        tokens = sum(len(r.text.split()) for r in self.results)
        return tokens / self.wall if self.wall > 0 else float("nan")


async def run_round(
    target: Target, streams: int, prompt_of: Callable[[int], str], give_up_after: float
) -> tuple[list[Result], float]:
    """`streams` streams at once; the ones still open after `give_up_after` seconds are cut
    and counted as timeouts."""
    results = [Result() for _ in range(streams)]
    start = time.perf_counter()
    tasks = [
        asyncio.create_task(one_stream(target, prompt_of(i), result))
        for i, result in enumerate(results)
    ]
    _, pending = await asyncio.wait(tasks, timeout=give_up_after)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return results, time.perf_counter() - start


@dataclass
class Bench:
    args: argparse.Namespace
    runner: asyncio.Runner
    pids: dict[str, int] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: f"{os.getpid()}-{time.time_ns() % 10**9}")

    @property
    def apis(self) -> list[str]:
        return [api.strip() for api in self.args.api.split(",") if api.strip()]

    @property
    def prompt_suffix(self) -> str:
        return f"#fake tokens={self.args.tokens} rate={self.args.rate:g}"

    @property
    def expected(self) -> str:
        return "".join(f"tok{i} " for i in range(self.args.tokens))

    def warm_up(self, target: Target) -> None:
        prompt = f"warm-up {self.run_id}-{target.name}: #fake tokens=3"
        self.runner.run(run_round(target, 5, lambda i: f"{prompt} n{i}", 60))

    def prompts(self, tag: str) -> Callable[[int], str]:
        """A distinct prompt per stream (no two requests look like one conversation)."""
        suffix = self.prompt_suffix
        return lambda i: f"bench {tag} s{i}: {suffix}"

    def level(self, target: Target, streams: int) -> Level:
        rounds = max(1, math.ceil(self.args.min_requests / streams))
        results: list[Result] = []
        wall = 0.0
        with Sampler(self.pids) as sampler:
            for r in range(rounds):
                prompts = self.prompts(f"{self.run_id} {target.name} N{streams} r{r}")
                got, seconds = self.runner.run(
                    run_round(target, streams, prompts, self.args.level_timeout)
                )
                results += got
                wall += seconds
        level = Level(target.name, streams, results, wall, sampler.usage(), self.expected)
        whole = level.whole()
        print(
            f"  {target.name:6} N={streams:<5} {len(results)} requests, {whole} whole, "
            f"{wall:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        return level


# --- the table ------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def fmt(value: float, digits: int = 0) -> str:
    return "–" if math.isnan(value) else f"{value:,.{digits}f}"


def errors_cell(counts: Counter[str]) -> str:
    if not counts:
        return "0"
    return "; ".join(f"{kind} ×{n}" for kind, n in counts.most_common())


COLUMNS = (
    "path",
    "requests",
    "whole",
    "errors by kind",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "added TTFT p50 ms",
    "tokens/s",
    "vs direct",
    "web peak RSS MB",
    "worker peak RSS MB",
    "web + worker peak PSS MB",
    "web CPU s",
    "worker CPU s",
    "upstream CPU s",
    "client CPU s",
    "wall s",
)


def row(level: Level, direct: Level | None) -> list[str]:
    ttft = level.ttfts()
    p50 = pct(ttft, 0.5) * 1000
    base = pct(direct.ttfts(), 0.5) * 1000 if direct else float("nan")
    rate = level.tokens_per_s()
    ratio = rate / direct.tokens_per_s() if direct else float("nan")
    usage = level.usage
    nan = Usage(float("nan"), float("nan"))
    web = usage.get("web", nan)
    workers = [found for name, found in usage.items() if name.startswith("worker")]
    worker = (  # with --workers N: the sum over the workers (peaks: an upper bound)
        Usage(sum(w.peak_rss_mb for w in workers), sum(w.cpu_s for w in workers))
        if workers
        else nan
    )
    return [
        level.target,
        str(len(level.results)),
        str(level.whole()),
        errors_cell(level.outcomes()) + (f" ({level.undrained})" if level.undrained else ""),
        fmt(p50, 1),
        fmt(pct(ttft, 0.99) * 1000, 1),
        "" if direct is None or level is direct else f"{p50 - base:+,.1f}",
        fmt(rate),
        "" if direct is None or level is direct else f"{ratio:.0%}",
        fmt(web.peak_rss_mb),
        fmt(worker.peak_rss_mb),
        fmt(usage.get("web+worker", nan).peak_pss_mb),
        fmt(web.cpu_s, 2),
        fmt(worker.cpu_s, 2),
        fmt(usage["upstream"].cpu_s, 2),
        fmt(usage["client"].cpu_s, 2),
        fmt(level.wall, 2),
    ]


def print_tables(
    levels: Iterable[int], direct: dict[int, Level], haia: dict[str, dict[int, Level]]
) -> None:
    for n in levels:
        rows = [found[n] for found in (direct, *haia.values()) if n in found]
        if not rows:
            continue
        print(f"\n### {n:,} concurrent stream{'s' if n > 1 else ''}\n")
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        base = direct.get(n)
        for level in rows:
            print("| " + " | ".join(row(level, base)) + " |")
    sys.stdout.flush()


# --- the run --------------------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; the children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def haia_env(
    args: argparse.Namespace, port: int, database_url: str, upstream: str
) -> dict[str, str]:
    return {
        "HAIA_HOST": "127.0.0.1",
        "HAIA_PORT": str(port),
        "HAIA_DATABASE_URL": database_url,
        "HAIA_REDIS_URL": args.redis_url,
        "HAIA_MODEL": "ollama:fake-model",
        "OLLAMA_BASE_URL": f"{upstream}/v1",
        "HAIA_API_KEYS": "",
        "HAIA_WORKER_MAX_JOBS": str(args.max_jobs),
        "HAIA_MAX_CONCURRENT_PER_OWNER": "0",
        "HAIA_MAX_STREAMS_PER_OWNER": "0",
        "HAIA_LOG_LEVEL": args.log_level,
    }


def drain(redis_url: str, timeout: float) -> str:
    """Wait for HAIA to finish what a level left running; '' when it did."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    queued = inflight = 0
    while time.monotonic() < deadline:
        queued = cast(int, client.zcard(keys.QUEUE))
        inflight = cast(int, client.hlen(keys.INFLIGHT))
        if queued == 0 and inflight == 0:
            return ""
        time.sleep(0.2)
    return f"still {queued} queued, {inflight} in flight {timeout:.0f} s later"


def start_upstream(work: Path) -> tuple[Proc, int]:
    port = free_port()
    fake = spawn(
        "fake-upstream", [sys.executable, "-m", "tests.fake_upstream", str(port)], {}, work
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/v1/models").status_code == 200, 30, "fake", [fake])
    return fake, port


def run_direct(bench: Bench, port: int, levels: list[int], found: dict[int, Level]) -> None:
    target = Target("direct", "127.0.0.1", port, "fake-model", history=bench.args.history)
    print("direct to the upstream:", file=sys.stderr, flush=True)
    bench.warm_up(target)
    for n in levels:
        found[n] = bench.level(target, n)


async def fill_database(database_url: str, count: int) -> float:
    """Migrate the database and store `count` messages in conversations of ten; seconds taken."""
    from tortoise import timezone

    from app.db import apply_migrations, close_database, open_database, raw
    from app.db.models import Conversation, Message

    started = time.perf_counter()
    run = uuid.uuid4().hex[:8]  # a database given with --database-url may hold an earlier run's
    await apply_migrations(database_url)
    await open_database(database_url)
    try:
        text = "A message stored long ago, about the length of a short chat turn. " * 4
        for first in range(0, count, 500):
            now = timezone.now()
            batch = range(first, min(first + 500, count))
            conversations = {f"stored-{run}-{n // 10}" for n in batch}
            await raw.insert(
                Conversation,
                [{"id": c, "owner": "stored", "created_at": now} for c in sorted(conversations)],
            )
            await raw.insert(
                Message,
                [
                    {
                        "conversation_id": f"stored-{run}-{n // 10}",
                        "role": "user" if n % 2 == 0 else "assistant",
                        "content": text,
                        "completion_id": None if n % 2 == 0 else f"stored-{run}-{n}",
                        "created_at": now,
                    }
                    for n in batch
                ],
            )
    finally:
        await close_database()
    return time.perf_counter() - started


def run_haia(
    bench: Bench, stack: Stack, levels: list[int], found: dict[str, dict[int, Level]]
) -> None:
    """Each level through each API of `--api`, one after the other, on one web and worker."""
    print("through HAIA:", file=sys.stderr, flush=True)
    stack.start_web()
    stack.start_worker()
    extra = [stack.start_extra_worker() for _ in range(bench.args.workers - 1)]
    assert stack.web is not None
    assert stack.worker is not None
    bench.pids.update(web=stack.web.process.pid, worker=stack.worker.process.pid)
    bench.pids.update({f"worker{i}": proc.process.pid for i, proc in enumerate(extra, start=2)})
    port = int(stack.base_url.rsplit(":", 1)[1])
    targets = [
        Target(APIS[api], "127.0.0.1", port, "ollama:fake-model", api, bench.args.history)
        for api in bench.apis
    ]
    for target in targets:
        bench.warm_up(target)
    drain(bench.args.redis_url, DRAIN_TIMEOUT)
    for n in levels:
        for target in targets:
            level = found.setdefault(target.name, {})[n] = bench.level(target, n)
            level.undrained = drain(bench.args.redis_url, DRAIN_TIMEOUT)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="1,10,100,500,1000", help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=40, help="tokens per answer")
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s of each stream")
    parser.add_argument("--database-url", default=None, help="default: SQLite in the temp dir")
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS_URL, help="a db of the bench's own: flushed at start"
    )
    parser.add_argument("--max-jobs", type=int, default=1000, help="HAIA_WORKER_MAX_JOBS")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (as `honcho start -c worker=N`); their CPU and RSS are summed",
    )
    parser.add_argument("--log-level", default="INFO", help="HAIA_LOG_LEVEL of web and worker")
    parser.add_argument(
        "--level-timeout",
        type=float,
        default=120.0,
        help="seconds before a round's streams are cut",
    )
    parser.add_argument(
        "--min-requests",
        type=int,
        default=10,
        help="small levels run in rounds until they have made this many requests",
    )
    parser.add_argument(
        "--direct-only", action="store_true", help="check the upstream and the client alone"
    )
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        help="earlier messages (about 1 KB each) every request resends, as OpenWebUI does",
    )
    parser.add_argument(
        "--stored",
        type=int,
        default=0,
        help="messages stored in the database before HAIA starts (a homelab's past chats)",
    )
    parser.add_argument(
        "--api",
        default="chat",
        help="through HAIA: chat, responses, or both (chat,responses), each level on each",
    )
    args = parser.parse_args(argv)
    unknown = {api.strip() for api in args.api.split(",")} - set(APIS)
    if unknown:
        parser.error(f"--api: unknown {', '.join(sorted(unknown))} (known: {', '.join(APIS)})")
    return args


def command_line() -> str:
    runner = "uv run python" if "UV" in os.environ else "python"
    return f"{runner} {shlex.join(sys.argv)}"


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> None:
    args = parse_args()
    levels = [int(n) for n in args.levels.split(",") if n.strip()]
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started ignoring it
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    nofile = raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="haia-load-"))
    database_url = args.database_url or f"sqlite://{work / 'haia.sqlite3'}"
    redis.Redis.from_url(args.redis_url).flushdb()
    print(f"$ {command_line()}")
    print(
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; "
        f"database {database_url.split(':')[0]}; {args.tokens} tokens at {args.rate:g} tokens/s "
        f"per stream; HAIA_WORKER_MAX_JOBS={args.max_jobs}; workers {args.workers}; "
        f"open files {nofile}; stored messages {args.stored}; "
        f"through HAIA: {args.api}; logs in {work}",
        flush=True,
    )
    fake, upstream_port = start_upstream(work)
    upstream = f"http://127.0.0.1:{upstream_port}"
    web_port = free_port()
    stack = Stack(
        f"http://127.0.0.1:{web_port}",
        haia_env(args, web_port, database_url, upstream),
        work,
        database_url,
        upstream,
    )
    direct: dict[int, Level] = {}
    haia: dict[str, dict[int, Level]] = {}
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            bench = Bench(args, runner, {"upstream": fake.process.pid})
            run_direct(bench, upstream_port, levels, direct)
            if args.stored and not args.direct_only:
                took = runner.run(fill_database(database_url, args.stored))
                print(f"stored {args.stored} messages in {took:.1f} s", flush=True)
            if not args.direct_only:
                run_haia(bench, stack, levels, haia)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the stop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        fake.stop()
        print_tables(levels, direct, haia)
        print(f"\nlogs (web, worker, upstream): {work}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: the levels measured so far are above", file=sys.stderr)
        sys.exit(130)
