"""Start-up defaults: models discovered from the upstreams, or a clear 503 when there is none."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REDIS_BASE, stack_env
from tests.procs import Stack, free_port

pytestmark = pytest.mark.e2e


def _stack(log_dir: Path, tmp_path: Path, upstream: str, **env: str) -> Stack:
    port = free_port()
    base = stack_env(
        port=port,
        database_url=f"sqlite://{tmp_path / 'haia.sqlite3'}",
        upstream=upstream,
        redis_url=f"{REDIS_BASE}/12",
    )
    del base["HAIA_MODEL"], base["HAIA_MODELS"]
    return Stack(
        base_url=f"http://127.0.0.1:{port}",
        env={**base, **env},
        log_dir=log_dir,
        database_url=base["HAIA_DATABASE_URL"],
        upstream_url=upstream,
    )


@pytest.fixture
def discovering(log_dir: Path, tmp_path: Path, fake_upstream: str) -> Iterator[Stack]:
    # A fallback poll of a minute: only the wake-up channel can make these requests prompt.
    stack = _stack(log_dir, tmp_path, fake_upstream, HAIA_WORKER_POLL_DELAY="60")
    stack.start_web()
    stack.start_worker()
    yield stack
    stack.stop()


@pytest.fixture
def without_upstream(log_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    stack = _stack(log_dir, tmp_path, f"http://127.0.0.1:{free_port()}")
    stack.start_web()
    stack.start_worker()
    yield stack
    stack.stop()


@pytest.mark.timeout(40)
def test_models_are_discovered_from_every_upstream(discovering: Stack) -> None:
    models = httpx.get(f"{discovering.base_url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [
        "ollama:fake-model",  # the first is the default
        "anthropic:claude-fake",  # Anthropic's models API
        "openai-chat:fake-model",
    ]
    for content in ("no model named", "again"):  # the first request and a later one
        response = httpx.post(
            f"{discovering.base_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": content}]},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "ollama:fake-model"
        assert response.json()["choices"][0]["message"]["content"] == f"Echo: {content}"


def test_no_upstream_still_starts_and_says_how_to_fix_it(without_upstream: Stack) -> None:
    health = httpx.get(f"{without_upstream.base_url}/health")
    assert health.status_code == 200
    upstream = health.json()["checks"]["upstream"]
    assert upstream["status"] == "unreachable"
    assert "unreachable" in upstream["detail"]

    assert httpx.get(f"{without_upstream.base_url}/v1/models").json()["data"] == []
    response = httpx.post(
        f"{without_upstream.base_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "stream": True},
        timeout=30,
    )
    assert response.status_code == 503
    error = response.json()["error"]
    assert "HAIA_MODEL" in error["message"] and error["code"] == "no_model_configured"
    # A model named as a newcomer would name it: not "does not exist", but why it cannot be
    # found (the server is down), and where to look.
    response = httpx.post(
        f"{without_upstream.base_url}/v1/chat/completions",
        json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "service_unavailable"
    assert "llama3.2" in error["message"] and "unreachable" in error["message"]
    assert "OLLAMA_BASE_URL" in error["message"]
