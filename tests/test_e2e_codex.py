"""The real Codex CLI (npm `@openai/codex`) end to end through HAIA: opt-in, `pytest -m codex`
(or `HAIA_TEST_CODEX=1`); scripts/install_codex.sh installs it into tests/.codex-cli/.

`codex exec` runs with HAIA as a custom model provider (`wire_api = "responses"`) in a fresh
CODEX_HOME, its sandbox set to let a shell command write in a temporary workspace. The fake
upstream's script rules play the model: asked to run the marker command, it thinks, then calls
Codex's shell tool `exec_command`; once the command's output (the marker) is in, it thinks
again and answers. Codex must run the command (the file is there), send its output back (the
fake saw it), show the thinking (it comes only from `response.reasoning_summary_text.*`) and
print the answer. Then `codex exec resume` asks a follow-up: Codex sends the whole chain again,
HAIA's own output items included (`store: false`, no `previous_response_id`), and the answer
must come back.

Between Codex and HAIA a wire tap forwards and keeps every exchange: what Codex sent (checked
against what Codex is known to send, so a new Codex that changes its wire shows up here) and
every event HAIA streamed back (checked strictly, tests/responses_spec.py). A trap set as
HTTP(S)_PROXY records any connection Codex tries beyond 127.0.0.1: there must be none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from tests.procs import Stack
from tests.responses_spec import check_stream

pytestmark = [pytest.mark.e2e, pytest.mark.codex]

ROOT = Path(__file__).resolve().parent.parent
CODEX = ROOT / "tests" / ".codex-cli" / "node_modules" / ".bin" / "codex"
MODELS = ["ollama:fake-model", "anthropic:claude-fake"]
PROMPT = "Please run the HAIA marker command in this directory."
MARKER = "haia-marker-123"
COMMAND = f"echo {MARKER} > out.txt; cat out.txt"
FIRST_THOUGHT = "I will run the marker command."
SECOND_THOUGHT = "The command printed the marker."
ANSWER = f"The file out.txt says {MARKER}."
FOLLOW_UP = "Thanks. Now say goodbye to the HAIA marker."
GOODBYE = f"Goodbye, {MARKER}."
CODEX_TIMEOUT = 120  # seconds for one `codex exec`
_HOP = {"host", "content-length", "accept-encoding", "connection", "transfer-encoding"}


@dataclass
class Exchange:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 0
    response: bytearray = field(default_factory=bytearray)


class WireTap:
    """A pass-through HTTP proxy that keeps every request and response it relays."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.exchanges: list[Exchange] = []
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        exchange = Exchange(
            request.method, request.path_qs, dict(request.headers), json.loads(raw or b"null")
        )
        self.exchanges.append(exchange)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        assert self.session is not None
        async with self.session.request(
            request.method, f"{self.target}{request.path_qs}", data=raw, headers=headers
        ) as upstream:
            exchange.status = upstream.status
            response = web.StreamResponse(
                status=upstream.status,
                headers={"content-type": upstream.headers.get("content-type", "")},
            )
            await response.prepare(request)
            client_gone = False
            async for chunk in upstream.content.iter_any():
                exchange.response += chunk
                if not client_gone:
                    try:
                        await response.write(chunk)
                    except ConnectionError:  # Codex leaves at response.completed: read on
                        client_gone = True
            if not client_gone:
                with contextlib.suppress(ConnectionError):
                    await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def serving(handler: Any) -> AsyncIterator[str]:
    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def proxy_trap() -> AsyncIterator[tuple[str, list[str]]]:
    """A forward proxy that refuses everything and keeps the request lines it got."""
    attempts: list[str] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append((await reader.readline()).decode(errors="replace").strip())
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", attempts
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="session")
def codex() -> Path:
    """The Codex CLI binary, installed on first use."""
    if not CODEX.exists():
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "install_codex.sh")], check=True, timeout=600
        )
    return CODEX


@pytest.fixture
async def marker_script(stack: Stack) -> AsyncIterator[None]:
    rules = [
        {
            "match": PROMPT,
            "think": FIRST_THOUGHT,
            "calls": [{"name": "exec_command", "arguments": {"cmd": COMMAND}}],
        },
        {"match": PROMPT, "after": MARKER, "think": SECOND_THOUGHT, "text": ANSWER},
        {"match": FOLLOW_UP, "text": GOODBYE},
    ]
    async with httpx.AsyncClient(base_url=stack.upstream_url) as upstream:
        await upstream.delete("/_requests")
        for rule in rules:
            assert (await upstream.post("/_script", json=rule)).status_code == 200
        yield
        await upstream.delete("/_script")


def codex_home(path: Path, base_url: str, model: str) -> Path:
    """A CODEX_HOME whose config.toml makes HAIA the provider and keeps Codex on loopback
    (plugins off: they fetch from github.com and chatgpt.com). No retries: a failure a retry
    would hide fails the test; `--strict-config` refuses a key this Codex does not know."""
    path.mkdir()
    (path / "config.toml").write_text(
        f"""model = "{model}"
model_provider = "haia"
check_for_update_on_startup = false

[model_providers.haia]
name = "HAIA"
base_url = "{base_url}/v1"
env_key = "HAIA_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0

[analytics]
enabled = false

[feedback]
enabled = false

[features]
plugins = false
"""
    )
    return path


async def run_codex(
    codex: Path, home: Path, work: Path, proxy: str, *turn: str
) -> tuple[int, str, str]:
    """`codex exec` in `work`, then `turn`: a prompt, or `resume <thread> <prompt>`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OPENAI_", "CODEX_", "HAIA_")) and "PROXY" not in key.upper()
    }
    env |= {
        "CODEX_HOME": str(home),
        "HAIA_API_KEY": "sk-codex-e2e",
        "HTTPS_PROXY": proxy,
        "HTTP_PROXY": proxy,
        "ALL_PROXY": proxy,
        "NO_PROXY": "127.0.0.1,localhost",
    }
    process = await asyncio.create_subprocess_exec(
        str(codex),
        "exec",
        "--strict-config",
        "--json",
        "--skip-git-repo-check",
        "--sandbox",
        "workspace-write",
        "--cd",
        str(work),
        *turn,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), CODEX_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def codex_events(stdout: str) -> list[dict[str, Any]]:
    """What `codex exec --json` reports, one JSON object a line."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def codex_items(stdout: str) -> list[dict[str, Any]]:
    """The items `codex exec --json` reports completed."""
    return [event["item"] for event in codex_events(stdout) if event["type"] == "item.completed"]


def tool_results(body: dict[str, Any]) -> list[str]:
    """The tool results a model request carries, on either wire."""
    results = []
    for message in body["messages"]:
        if message["role"] == "tool":
            results.append(json.dumps(message["content"]))
        elif isinstance(message["content"], list):
            results += [json.dumps(b) for b in message["content"] if b.get("type") == "tool_result"]
    return results


def offered(body: dict[str, Any]) -> list[str]:
    return [tool.get("name") or tool["function"]["name"] for tool in body.get("tools") or []]


def check_codex_request(exchange: Exchange) -> None:
    """What Codex 0.171 sends (read on the wire), so that a change of its wire shows up."""
    body = exchange.body
    assert exchange.method == "POST" and exchange.path == "/v1/responses"
    assert exchange.headers["Authorization"] == "Bearer sk-codex-e2e"
    assert exchange.headers["Accept"] == "text/event-stream"
    assert body["stream"] is True and body["store"] is False
    assert "previous_response_id" not in body
    assert body["include"] == ["reasoning.encrypted_content"]
    assert body["reasoning"] == {"summary": "auto"}
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is True
    kinds = {tool["type"] for tool in body["tools"]}
    assert {"function", "namespace", "web_search"} <= kinds
    assert "exec_command" in [tool.get("name") for tool in body["tools"]]
    roles = [item.get("role") for item in body["input"] if item.get("type") == "message"]
    assert roles[0] == "developer" and roles[-1] == "user"


@pytest.mark.timeout(600)  # a first run installs the CLI; then two `codex exec` runs
@pytest.mark.parametrize("model", MODELS)
async def test_codex_runs_a_shell_command_and_answers_through_haia(
    stack: Stack, codex: Path, marker_script: None, tmp_path: Path, model: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    tap = WireTap(stack.base_url)
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
        serving(tap.handle) as tapped,
        proxy_trap() as (proxy, attempts),
    ):
        tap.session = session
        home = codex_home(tmp_path / "codex-home", tapped, model)
        code, out, err = await run_codex(codex, home, work, proxy, PROMPT)
        assert code == 0, f"codex exec failed ({code}):\n{err}\n{out}"
        [thread] = [e["thread_id"] for e in codex_events(out) if e["type"] == "thread.started"]
        code, again, err = await run_codex(codex, home, work, proxy, "resume", thread, FOLLOW_UP)
        assert code == 0, f"codex exec resume failed ({code}):\n{err}\n{again}"

    # The command ran in the workspace, and Codex showed the thinking and printed the answer.
    assert (work / "out.txt").read_text() == f"{MARKER}\n"
    items = codex_items(out)
    assert [i["text"] for i in items if i["type"] == "reasoning"] == [FIRST_THOUGHT, SECOND_THOUGHT]
    [command] = [i for i in items if i["type"] == "command_execution"]
    assert COMMAND in command["command"] and command["exit_code"] == 0
    assert MARKER in command["aggregated_output"]
    assert [i["text"] for i in items if i["type"] == "agent_message"] == [ANSWER]

    # The chain goes on: resumed, the whole conversation is sent again and answered.
    assert [i["text"] for i in codex_items(again) if i["type"] == "agent_message"] == [GOODBYE]

    # Three requests on the wire, each answered by a strictly valid stream.
    turns = [e for e in tap.exchanges if e.path == "/v1/responses"]
    assert len(turns) == 3, [(e.method, e.path, e.status) for e in tap.exchanges]
    for exchange in turns:
        check_codex_request(exchange)
        assert exchange.status == 200, exchange.response.decode()
        stream = check_stream(exchange.response.decode())
        assert not stream.of_type("response.reasoning_text.delta")  # summary only, once
        thought = exchange is not turns[2]  # the follow-up's answer comes without thinking
        assert bool(stream.of_type("response.reasoning_summary_text.delta")) is thought
    second_input = turns[1].body["input"]
    [output] = [item for item in second_input if item["type"] == "function_call_output"]
    assert MARKER in output["output"]
    # The third carries HAIA's own output items back (reasoning, the call, the answer).
    third_input = turns[2].body["input"]
    kinds = [item["type"] for item in third_input]
    assert kinds.count("reasoning") == 2 and "function_call" in kinds
    replayed = [i for i in third_input if i.get("role") == "assistant"]
    assert ANSWER in json.dumps(replayed)

    # The model was offered Codex's shell tool (not the hosted web_search) and saw the output;
    # on the follow-up, the whole chain: the tool exchange and the answer.
    first, second, third = (r["body"] for r in await stack.upstream_requests())
    assert "exec_command" in offered(first) and "web_search" not in offered(first)
    assert not tool_results(first)
    assert any(MARKER in result for result in tool_results(second))
    assert any(MARKER in result for result in tool_results(third))
    assert ANSWER in json.dumps(third["messages"])

    assert attempts == [], f"Codex tried to leave 127.0.0.1: {attempts}"
