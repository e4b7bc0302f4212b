"""Shared fixtures: real Redis, real databases (SQLite and PostgreSQL), a fake upstream LLM."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest
import redis
import redis.asyncio as aioredis

from tests import services
from tests.procs import Stack, free_port, spawn, wait_until

# The machine's Redis and PostgreSQL, or ones this session starts (see tests/services.py).
SERVICES = services.start()
REDIS_BASE = SERVICES.redis_base
REDIS_URL = f"{REDIS_BASE}/9"
POSTGRES_URL = SERVICES.postgres_url

OPT_IN = {"codex": "HAIA_TEST_CODEX", "openwebui": "HAIA_TEST_OPENWEBUI"}
"""Markers of tests that run a heavy real client, and the variable that also opts them in."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `codex` (the real Codex CLI, installed from npm) or `openwebui` (the real
    OpenWebUI, installed from PyPI) run only when asked for: `-m <marker>` or its variable."""
    expression = str(config.getoption("markexpr", ""))
    for marker, variable in OPT_IN.items():
        if marker in expression or os.environ.get(variable):
            continue
        skip = pytest.mark.skip(reason=f"the {marker} test is opt-in: -m {marker} or {variable}=1")
        for item in items:
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def fake_upstream(log_dir: Path) -> Iterator[str]:
    """The fake OpenAI-compatible LLM server, as a real process on loopback."""
    port = free_port()
    proc = spawn("fake-upstream", ["python", "-m", "tests.fake_upstream", str(port)], {}, log_dir)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/v1/models").status_code == 200, 30, "fake", [proc])
    yield url
    proc.stop()


async def _create_pg_database(name: str) -> None:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@asynccontextmanager
async def empty_database(kind: str, directory: Path) -> AsyncIterator[str]:
    """The URL of a new, empty database: an SQLite file in `directory`, or a PostgreSQL
    database of its own (dropped afterwards)."""
    if kind == "sqlite":
        yield f"sqlite://{directory / 'haia.sqlite3'}"
        return
    name = f"haia_test_{uuid.uuid4().hex[:12]}"
    await _create_pg_database(name)
    try:
        yield f"{POSTGRES_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        await _drop_pg_database(name)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
async def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """A fresh, empty database of each kind, shared by the session's tests."""
    async with empty_database(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[str]:
    """Tortoise opened on `database_url` (each of SQLite and PostgreSQL), migrated."""
    from tortoise.backends.base.executor import EXECUTOR_CACHE

    from app.db import apply_migrations, close_database, open_database

    EXECUTOR_CACHE.clear()  # Tortoise caches SQL per connection name across inits
    await apply_migrations(database_url)
    await open_database(database_url)
    yield database_url
    await close_database()
    EXECUTOR_CACHE.clear()


@pytest.fixture(scope="session")
async def redis_db() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    await client.flushdb()
    yield client
    await client.aclose()


def stack_env(
    *, port: int, database_url: str, upstream: str, redis_url: str = REDIS_URL, **extra: str
) -> dict[str, str]:
    return {
        "HAIA_PORT": str(port),
        "HAIA_DATABASE_URL": database_url,
        "HAIA_REDIS_URL": redis_url,
        "OLLAMA_BASE_URL": f"{upstream}/v1",
        "HAIA_MODEL": "ollama:fake-model",
        "HAIA_MODELS": "openai-chat:fake-model,anthropic:claude-fake",
        "OPENAI_BASE_URL": f"{upstream}/v1",
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "ANTHROPIC_BASE_URL": upstream,
        "ANTHROPIC_API_KEY": "sk-ant-test-not-a-real-key",
        "HAIA_LOG_LEVEL": "INFO",
        # Tests open many streams as one client; tests/test_e2e_limits.py sets the limits.
        "HAIA_MAX_CONCURRENT_PER_OWNER": "0",
        "HAIA_MAX_STREAMS_PER_OWNER": "0",
        **extra,
    }


@pytest.fixture(scope="session")
async def stack(database_url: str, fake_upstream: str, log_dir: Path) -> AsyncIterator[Stack]:
    """web + worker started from the Procfile, on each database (each with its own Redis db)."""
    port = free_port()
    redis_url = f"{REDIS_BASE}/{10 if database_url.startswith('sqlite') else 11}"
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    running = Stack(
        base_url=f"http://127.0.0.1:{port}",
        env=stack_env(
            port=port, database_url=database_url, upstream=fake_upstream, redis_url=redis_url
        ),
        log_dir=log_dir,
        database_url=database_url,
        upstream_url=fake_upstream,
    )
    running.start_web()
    running.start_worker()
    yield running
    running.stop()


@pytest.fixture
def make_stack(
    database_url: str, fake_upstream: str, log_dir: Path
) -> Iterator[Callable[..., Stack]]:
    """Stacks of one's own (not started), for tests that kill and restart processes."""
    made: list[Stack] = []

    def make(redis_url: str = f"{REDIS_BASE}/13", **env: str) -> Stack:
        redis.Redis.from_url(redis_url).flushdb()
        port = free_port()
        stack = Stack(
            base_url=f"http://127.0.0.1:{port}",
            env={
                **stack_env(
                    port=port,
                    database_url=database_url,
                    upstream=fake_upstream,
                    redis_url=redis_url,
                ),
                **env,
            },
            log_dir=log_dir,
            database_url=database_url,
            upstream_url=fake_upstream,
        )
        made.append(stack)
        return stack

    yield make
    for stack in made:
        stack.stop()
