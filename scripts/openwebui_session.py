"""Replay an OpenWebUI-style session against a real HAIA and show what it stored and sent.

Five turns as OpenWebUI sends them (full history every time, the chat id header, a title task
before the first turn), one of them a regeneration. After each request it prints what the fake
upstream received; at the end, the rows HAIA stored.

    uv run python scripts/openwebui_session.py [--database-url postgres://…]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

import httpx
import redis

from tests import dbcheck
from tests.conftest import stack_env
from tests.procs import Stack, free_port, spawn, wait_until

CHAT = {"X-OpenWebUI-Chat-Id": "demo-chat", "X-OpenWebUI-User-Id": "demo-user"}
TITLE_TASK = (
    "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
    "### Chat History:\nUSER: Which NAS for Jellyfin?"
)


async def send(
    http: httpx.AsyncClient, stack: Stack, messages: list[dict[str, str]], *, stream: bool = True
) -> tuple[str, str]:
    await http.delete(f"{stack.upstream_url}/_requests")
    body = {"model": "ollama:fake-model", "messages": messages, "stream": stream}
    response = await http.post(f"{stack.base_url}/v1/chat/completions", json=body, headers=CHAT)
    text = ""
    if stream:
        for line in response.text.splitlines():
            if line.startswith("data: {"):
                import json

                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    else:
        text = response.json()["choices"][0]["message"]["content"]
    received = (await http.get(f"{stack.upstream_url}/_requests")).json()
    sent = [(m["role"], m["content"][:40]) for m in received[0]["body"]["messages"]]
    print(f"  upstream received {len(sent)} messages: {sent}")
    return response.headers.get("x-conversation-id", ""), text


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


async def session(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        print("title task (sent just before turn 1)")
        await send(http, stack, [user(TITLE_TASK)], stream=False)
        history: list[dict[str, str]] = []
        for turn, question in enumerate(
            ["Which NAS for Jellyfin?", "How much RAM?", "ZFS or btrfs?"], start=1
        ):
            history.append(user(question))
            print(f"turn {turn}: {question}")
            _, answer = await send(http, stack, history)
            history.append(bot(answer))
        print("turn 4: regenerate the answer to turn 3")
        history = history[:-1]
        _, answer = await send(http, stack, history)
        history.append(bot(answer))
        history.append(user("And for backups?"))
        print("turn 5: And for backups?")
        await send(http, stack, history)
    rows = await dbcheck.query(
        stack.database_url,
        "SELECT c.id AS conversation, c.parent_id, c.title, m.role, m.content, m.status "
        "FROM haia_message m JOIN haia_conversation c ON c.id = m.conversation_id ORDER BY m.id",
    )
    print("\nstored rows (conversation, parent, title, role, content, status):")
    for row in rows:
        print(
            f"  {row['conversation'][:8]} {str(row['parent_id'])[:8]:8} {row['title']!r:16}"
            f" {row['role']:9} {row['content'][:38]!r} {row['status']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="haia-session-"))
    database_url = args.database_url or f"sqlite://{work / 'haia.sqlite3'}"
    redis_url = "redis://127.0.0.1:6379/8"
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    fake = spawn("fake-upstream", ["python", "-m", "tests.fake_upstream", str(port)], {}, work)
    upstream = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{upstream}/v1/models").status_code == 200, 30, "fake", [fake])
    web_port = free_port()
    env: dict[str, Any] = stack_env(
        port=web_port,
        database_url=database_url,
        upstream=upstream,
        redis_url=redis_url,
        HAIA_LOG_LEVEL="WARNING",
    )
    stack = Stack(f"http://127.0.0.1:{web_port}", env, work, database_url, upstream)
    try:
        stack.start_web()
        stack.start_worker()
        asyncio.run(session(stack))
    finally:
        stack.stop()
        fake.stop()


if __name__ == "__main__":
    main()
