"""`uv run pytest` on a machine with no Redis and no PostgreSQL: the session starts its own."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import redis

from app.db import apply_migrations
from tests import services
from tests.procs import free_port


@pytest.mark.timeout(120)
async def test_a_machine_without_services_gets_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HAIA_TEST_REDIS_URL", raising=False)
    monkeypatch.delenv("HAIA_TEST_POSTGRES_URL", raising=False)
    nothing_there = free_port()  # probe a port nobody listens on, as a fresh machine's 6379/5432
    started = services.start(redis_port=nothing_there, postgres_port=nothing_there)
    try:
        assert f":{nothing_there}" not in started.redis_base
        client = redis.Redis.from_url(f"{started.redis_base}/0")
        assert client.ping()
        client.close()
        # The same database HAIA's migrations and PostgreSQL tests run on.
        await apply_migrations(started.postgres_url)
    finally:
        started.stop()
    assert not services._postgres_answers(port=urlsplit(started.postgres_url).port or 0)


def test_given_urls_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAIA_TEST_REDIS_URL", "redis://elsewhere:6380/")
    monkeypatch.setenv("HAIA_TEST_POSTGRES_URL", "postgres://u@elsewhere:5433/t")
    given = services.start()
    assert (given.redis_base, given.postgres_url) == (
        "redis://elsewhere:6380",
        "postgres://u@elsewhere:5433/t",
    )
