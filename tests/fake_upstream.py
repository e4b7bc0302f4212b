"""A fake LLM server speaking the OpenAI Chat Completions wire format (as Ollama's `/v1` does).

Run it with `python -m tests.fake_upstream PORT`. What it answers is steered by a directive in
the last user message, so tests drive it through HAIA like a real user would:

    #fake tokens=40 delay=0.01 first=0.5 status=429 retry_after=2 cut=5 hang garbage
    #fake status=503 fail=2     (the first 2 requests with this text fail, later ones succeed)
    #fake tokens=40 rate=20     (20 tokens/s on a fixed schedule: a late tick does not slow the
                                 rest, as `delay` would; for load benchmarks)

Without a directive it answers "Echo: <the user's text>" word by word. `GET /_requests`
returns every chat request it received (bodies as sent); `DELETE /_requests` forgets them.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from typing import Any

from sanic import HTTPResponse, Request, Sanic
from sanic.response import json as json_response

_DIRECTIVE = re.compile(r"#fake((?:\s+\w+(?:=[\w.]+)?)*)")


def directives(text: str) -> dict[str, str]:
    match = _DIRECTIVE.search(text)
    if match is None:
        return {}
    pairs = (item.partition("=") for item in match.group(1).split())
    return {key: value or "1" for key, _, value in pairs}


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def reply_tokens(text: str, options: dict[str, str]) -> list[str]:
    if text.lstrip().startswith("### Task:") and "title" in text.lower():
        return ['{"title": ', '"Homelab ', 'Chat"}']
    if "tokens" in options:
        return [f"tok{i} " for i in range(int(options["tokens"]))]
    words = f"Echo: {_DIRECTIVE.sub('', text).strip()}".split(" ")
    return [word if i == 0 else f" {word}" for i, word in enumerate(words)]


def create_app() -> Sanic[Any, Any]:
    app = Sanic("fake_upstream")
    app.ctx.requests = []
    app.ctx.failures = {}

    @app.get("/v1/models")
    async def models(request: Request) -> HTTPResponse:
        return json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    @app.get("/_requests")
    async def recorded(request: Request) -> HTTPResponse:
        return json_response(app.ctx.requests)

    @app.delete("/_requests")
    async def forget(request: Request) -> HTTPResponse:
        app.ctx.requests.clear()
        app.ctx.failures.clear()
        return json_response({})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> HTTPResponse | None:
        body = request.json
        app.ctx.requests.append({"body": body, "headers": dict(request.headers)})
        options = directives(_last_user_text(body))
        failures = app.ctx.failures
        key = _last_user_text(body)
        failures[key] = failures.get(key, 0) + 1
        if "fail" in options and failures[key] > int(options["fail"]):
            options.pop("status", None)
        if "garbage" in options:
            return HTTPResponse("<html>this is not an LLM</html>", content_type="text/html")
        if "status" in options:
            status = int(options["status"])
            headers = {"retry-after": options["retry_after"]} if "retry_after" in options else {}
            kind = "overloaded_error" if status == 529 else "api_error"
            error = {"message": f"fake error {status}", "type": kind, "code": None}
            return json_response({"error": error}, status=status, headers=headers)
        if "hang" in options:
            await asyncio.sleep(3600)
        await asyncio.sleep(float(options.get("first", 0)))
        tokens = reply_tokens(_last_user_text(body), options)
        usage = {
            "prompt_tokens": sum(len(str(m.get("content", ""))) // 4 for m in body["messages"]),
            "completion_tokens": len(tokens),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        ident = f"chatcmpl-fake{time.time_ns()}"
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(tokens)}
            return json_response(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": usage,
                }
            )
        await _stream(request, body, tokens, usage, options, ident)
        return None

    return app


async def _stream(
    request: Request,
    body: dict[str, Any],
    tokens: list[str],
    usage: dict[str, int],
    options: dict[str, str],
    ident: str,
) -> None:
    created, model = int(time.time()), body["model"]
    response = await request.respond(content_type="text/event-stream")

    async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
        chunk = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }
        await response.send(f"data: {json.dumps(chunk)}\n\n")

    delay, cut = float(options.get("delay", 0)), int(options.get("cut", -1))
    rate = float(options.get("rate", 0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await send([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
    for i, token in enumerate(tokens):
        if i == cut:
            request.transport.close()
            return
        await send([{"index": 0, "delta": {"content": token}, "finish_reason": None}])
        if rate:
            await asyncio.sleep(max(0.0, started + (i + 1) / rate - loop.time()))
        elif delay:
            await asyncio.sleep(delay)
    await send([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    if (body.get("stream_options") or {}).get("include_usage"):
        await send([], usage=usage)
    await response.send("data: [DONE]\n\n")
    await response.eof()


if __name__ == "__main__":
    fake = create_app()
    fake.run(
        host="127.0.0.1",
        port=int(sys.argv[1]),
        single_process=True,
        access_log=False,
        motd=False,
        backlog=4096,  # load benchmarks open 1,000 connections at once; Sanic's default is 100
    )
