"""Running HAIA as a service: access log, /metrics, CORS, /health and the docs, with keys on."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REDIS_BASE, stack_env
from tests.procs import Stack, free_port, wait_until
from tests.sse import read_all

pytestmark = pytest.mark.e2e

KEY = "ops-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://app.example"
OPS_REDIS_URL = f"{REDIS_BASE}/14"

StackFactory = Callable[..., Stack]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def ops(database_url: str, fake_upstream: str, log_dir: Path) -> Iterator[Stack]:
    """web + worker with keys, CORS for one origin and JSON logs, on a Redis db of its own."""
    redis.Redis.from_url(OPS_REDIS_URL).flushdb()
    port = free_port()
    env = stack_env(
        port=port,
        database_url=database_url,
        upstream=fake_upstream,
        redis_url=OPS_REDIS_URL,
        HAIA_API_KEYS=KEY,
        HAIA_CORS_ORIGINS=ORIGIN,
        HAIA_LOG_FORMAT="json",
    )
    stack = Stack(
        base_url=f"http://127.0.0.1:{port}",
        env=env,
        log_dir=log_dir,
        database_url=database_url,
        upstream_url=fake_upstream,
    )
    stack.start_web()
    stack.start_worker()
    yield stack
    stack.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30, headers=AUTH) as client:
        yield client


def chat(content: str, *, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "ollama:fake-model",
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
    }


def access_lines(stack: Stack, request_id: str) -> list[dict[str, Any]]:
    assert stack.web is not None
    lines = [json.loads(line) for line in stack.web.log().splitlines() if line.startswith("{")]
    return [
        line
        for line in lines
        if line["logger"] == "haia.access" and line["request_id"] == request_id
    ]


async def wait_for(check: Callable[[], Any], what: str) -> Any:
    for _ in range(200):
        if result := check():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --- access log -------------------------------------------------------------------------------


async def test_access_log_has_one_json_line_per_request_streams_at_their_end(
    ops: Stack, http: httpx.AsyncClient
) -> None:
    response = await http.get(f"{ops.base_url}/v1/models", headers={"X-Request-ID": "acc-json-1"})
    assert response.status_code == 200
    async with http.stream(
        "POST",
        f"{ops.base_url}/v1/chat/completions",
        json=chat("#fake tokens=10 delay=0.05", stream=True),
        headers={"X-Request-ID": "acc-stream-1"},
    ) as streamed:
        frames = await read_all(streamed)
    assert frames[-1].data == "[DONE]"
    missing = await http.get(f"{ops.base_url}/nowhere", headers={"X-Request-ID": "acc-404"})
    assert missing.status_code == 404

    [plain] = await wait_for(lambda: access_lines(ops, "acc-json-1"), "the models line")
    assert (plain["method"], plain["path"], plain["status"]) == ("GET", "/v1/models", 200)
    assert plain["process"] == "web" and plain["duration_ms"] >= 0
    assert plain["message"].startswith("GET /v1/models 200 ")
    [stream] = await wait_for(lambda: access_lines(ops, "acc-stream-1"), "the stream line")
    assert (stream["method"], stream["path"], stream["status"]) == (
        "POST",
        "/v1/chat/completions",
        200,
    )
    assert stream["duration_ms"] >= 450  # the whole stream (10 tokens 50 ms apart), not its start
    [unknown] = await wait_for(lambda: access_lines(ops, "acc-404"), "the 404 line")
    assert (unknown["path"], unknown["status"]) == ("/nowhere", 404)


@pytest.mark.parametrize(("log_format", "enabled"), [("text", "true"), ("json", "false")])
def test_access_log_in_text_and_switched_off(
    make_stack: StackFactory, log_format: str, enabled: str
) -> None:
    stack = make_stack(HAIA_LOG_FORMAT=log_format, HAIA_ACCESS_LOG=enabled)
    web = stack.start_web()
    for _ in range(2):
        response = httpx.get(f"{stack.base_url}/v1/models", headers={"X-Request-ID": "acc-text"})
        assert response.status_code == 200
    time.sleep(0.3)  # the lines of requests already answered
    lines = [line for line in web.log().splitlines() if "haia.access [acc-text]" in line]
    if enabled == "false":
        assert lines == []
        return
    assert len(lines) == 2, web.log()
    assert " INFO web haia.access [acc-text] GET /v1/models 200 " in lines[0]
    assert lines[0].endswith("ms")


# --- /metrics ---------------------------------------------------------------------------------


async def scrape(http: httpx.AsyncClient, base_url: str) -> Samples:
    response = await http.get(f"{base_url}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_need_a_key(ops: Stack) -> None:
    response = httpx.get(f"{ops.base_url}/metrics")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


async def test_metrics_count_requests_generations_tokens_and_first_tokens(
    ops: Stack, http: httpx.AsyncClient
) -> None:
    model = "ollama:fake-model"
    before = await scrape(http, ops.base_url)
    done = await http.post(f"{ops.base_url}/v1/chat/completions", json=chat("#fake tokens=5"))
    assert done.status_code == 200
    stored = await http.get(f"{ops.base_url}/v1/chat/completions/{done.json()['id']}")
    assert stored.status_code == 200

    async def counted() -> Samples:
        # The worker records a generation just after announcing its end, and the web counts
        # a request after answering it: both may land a moment after the client is done.
        route = "/v1/chat/completions/{completion_id}"
        for _ in range(200):
            after = await scrape(http, ops.base_url)
            if value(after, "haia_http_requests_total", route=route, status="200") > value(
                before, "haia_http_requests_total", route=route, status="200"
            ) and value(after, "haia_generations_total", model=model, status="completed") > value(
                before, "haia_generations_total", model=model, status="completed"
            ):
                return after
            await asyncio.sleep(0.05)
        raise AssertionError("the retrieval or the generation was never counted")

    after = await counted()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("haia_http_requests_total", route="/v1/chat/completions", status="200") == 1
    assert delta("haia_generations_total", model=model, status="completed") == 1
    assert delta("haia_tokens_total", model=model, kind="completion") == 5
    assert delta("haia_tokens_total", model=model, kind="prompt") > 0
    assert delta("haia_generation_ttft_seconds_count", model=model) == 1
    assert delta("haia_generation_ttft_seconds_bucket", model=model, le="+Inf") == 1
    assert 0 < delta("haia_generation_ttft_seconds_sum", model=model) < 10
    assert value(after, "haia_workers") == 1
    assert value(after, "haia_queue_depth") == 0
    assert not [key for key in after if "/v1/chat/completions/chatcmpl-" in str(key)]


async def test_metrics_gauges_show_a_running_generation(
    ops: Stack, http: httpx.AsyncClient
) -> None:
    async with http.stream(
        "POST",
        f"{ops.base_url}/v1/chat/completions",
        json=chat("#fake tokens=40 delay=0.05", stream=True),
    ) as streamed:
        running = await scrape(http, ops.base_url)
        frames = await read_all(streamed)
    assert frames[-1].data == "[DONE]"
    assert value(running, "haia_generations_in_flight") == 1
    assert value(running, "haia_queue_depth") == 0
    idle = await wait_for_value(http, ops.base_url, "haia_generations_in_flight", 0)
    assert value(idle, "haia_workers") == 1


async def wait_for_value(
    http: httpx.AsyncClient, base_url: str, name: str, expected: float
) -> Samples:
    for _ in range(100):
        samples = await scrape(http, base_url)
        if value(samples, name) == expected:
            return samples
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never became {expected}")


# --- CORS ---------------------------------------------------------------------------------------


def preflight(base_url: str, origin: str, headers: str, method: str = "POST") -> httpx.Response:
    return httpx.options(
        f"{base_url}/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    )


def test_cors_preflight_needs_no_key_and_allows_the_sdk_headers(ops: Stack) -> None:
    asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count, last-event-id"
    response = preflight(ops.base_url, ORIGIN, asked)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["access-control-allow-headers"] == asked
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "Origin" in response.headers["vary"]

    odd = preflight(ops.base_url, ORIGIN, "authorization, x-not-allowed")
    assert "x-not-allowed" not in odd.headers["access-control-allow-headers"].lower()
    assert "Authorization" in odd.headers["access-control-allow-headers"]

    stranger = preflight(ops.base_url, "http://evil.example", "authorization")
    assert stranger.status_code == 204
    assert "access-control-allow-origin" not in stranger.headers


async def test_cors_cross_origin_requests_carry_the_headers(
    ops: Stack, http: httpx.AsyncClient
) -> None:
    headers = {"Origin": ORIGIN}
    done = await http.post(f"{ops.base_url}/v1/chat/completions", json=chat("hi"), headers=headers)
    assert done.status_code == 200
    assert done.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip().lower() for h in done.headers["access-control-expose-headers"].split(",")}
    assert exposed == {"x-conversation-id", "x-request-id", "retry-after"}
    async with http.stream(
        "POST",
        f"{ops.base_url}/v1/chat/completions",
        json=chat("#fake tokens=3", stream=True),
        headers=headers,
    ) as streamed:
        assert streamed.headers["access-control-allow-origin"] == ORIGIN
        await read_all(streamed)
    refused = await http.get(f"{ops.base_url}/v1/models", headers={**headers, "Authorization": ""})
    assert refused.status_code == 401  # a browser app can read why
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    other = await http.get(f"{ops.base_url}/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_no_cors_by_default(stack: Stack) -> None:
    response = httpx.get(f"{stack.base_url}/v1/models", headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    answered = preflight(stack.base_url, ORIGIN, "authorization")
    assert "access-control-allow-origin" not in answered.headers


# --- /health ------------------------------------------------------------------------------------


def test_health_without_a_key_says_only_up_or_down(ops: Stack) -> None:
    terse = httpx.get(f"{ops.base_url}/health")
    assert terse.status_code == 200
    body = terse.json()
    assert body["auth"] == "on"
    assert body["checks"] == {
        "database": {"status": "ok"},
        "redis": {"status": "ok"},
        "workers": {"status": "ok"},
        "upstream": {"status": "ok"},
    }
    detailed = httpx.get(f"{ops.base_url}/health", headers=AUTH).json()
    workers = detailed["checks"]["workers"]
    assert workers["count"] == 1 and len(workers["ids"]) == 1
    assert detailed["checks"]["upstream"]["models"] >= 1


def test_health_follows_the_worker_heartbeats(make_stack: StackFactory) -> None:
    stack = make_stack(HAIA_WORKER_DEAD_AFTER="2")
    stack.start_web()
    worker = stack.start_worker()
    health = httpx.get(f"{stack.base_url}/health").json()
    assert health["auth"] == "off"
    assert health["checks"]["workers"]["count"] == 1
    worker.stop(signal.SIGKILL)  # no goodbye: only the heartbeat's TTL tells
    wait_until(lambda: httpx.get(f"{stack.base_url}/health").status_code == 503, 10, "503")
    down = httpx.get(f"{stack.base_url}/health").json()["checks"]["workers"]
    assert down == {
        "status": "down",
        "detail": "no worker heartbeat in Redis",
        "count": 0,
        "ids": [],
    }
    stack.start_worker()  # waits for 200
    assert httpx.get(f"{stack.base_url}/health").json()["checks"]["workers"]["count"] == 1


def test_the_address_itself_says_where_everything_is(ops: Stack) -> None:
    """What a newcomer opening http://127.0.0.1:8000 sees: no key needed, links that work."""
    index = httpx.get(f"{ops.base_url}/")
    assert index.status_code == 200
    links = index.json()
    assert links["name"] == "HAIA" and links["api"] == "/v1"
    assert httpx.get(f"{ops.base_url}{links['health']}").status_code == 200
    assert httpx.get(f"{ops.base_url}{links['docs']}").status_code == 200
    assert httpx.get(f"{ops.base_url}{links['models']}", headers=AUTH).status_code == 200
    assert httpx.get(f"{ops.base_url}{links['models']}").status_code == 401  # the API needs one


# --- docs ---------------------------------------------------------------------------------------


def test_docs_are_public_and_declare_the_bearer_scheme(ops: Stack) -> None:
    assert httpx.get(f"{ops.base_url}/docs").status_code == 200
    document = httpx.get(f"{ops.base_url}/docs/openapi.json")
    assert document.status_code == 200
    spec = document.json()
    assert spec["components"]["securitySchemes"]["bearer"]["type"] == "http"
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    paths = spec["paths"]
    for path, method in [
        ("/v1/chat/completions", "post"),
        ("/v1/models", "get"),
        ("/v1/chat/completions/{completion_id}/stream", "get"),
        ("/v1/conversations/{conversation_id}", "delete"),
        ("/metrics", "get"),
    ]:
        assert paths[path][method]["security"] == [{"bearer": []}], path
    assert "security" not in paths["/health"]["get"]
