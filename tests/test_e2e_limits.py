"""Limits per owner: a client cannot queue without bound or send without bound (issue 12)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from tests.procs import Stack
from tests.test_e2e_durability import start_stream

pytestmark = pytest.mark.e2e


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=30)) as client:
        yield client


def body(content: str, **extra: object) -> dict[str, object]:
    return {
        "model": "ollama:fake-model",
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


async def test_one_generation_too_many_is_a_429_with_retry_after(
    make_stack: Callable[..., Stack], http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_MAX_CONCURRENT_PER_OWNER="1")
    stack.start_web()
    stack.start_worker()
    url = f"{stack.base_url}/v1/chat/completions"
    first, _ = await start_stream(http, stack, "#fake tokens=60 delay=0.03", read=2)
    refused = await http.post(url, json=body("one more"))
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert int(refused.headers["retry-after"]) >= 1
    # Another owner is not held back by this one.
    other = await http.post(url, json=body("me too"), headers={"X-OpenWebUI-User-Id": "bob"})
    assert other.status_code == 200, other.text
    async with asyncio.timeout(20):  # once the first has ended, the next is served
        while (await http.get(f"{url}/{first}")).json()["status"] == "in_progress":
            await asyncio.sleep(0.1)
    assert (await http.post(url, json=body("now"))).status_code == 200


async def test_too_many_messages_is_a_400_naming_messages(
    make_stack: Callable[..., Stack], http: httpx.AsyncClient
) -> None:
    stack = make_stack(HAIA_MAX_MESSAGES="3")
    stack.start_web()
    messages = [{"role": "user", "content": f"m{i}"} for i in range(4)]
    response = await http.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": "ollama:fake-model", "messages": messages},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages"
    assert "HAIA_MAX_MESSAGES" in response.json()["error"]["message"]
