"""A fake LLM server speaking the OpenAI Chat Completions wire and the Anthropic Messages wire.

Run it with `python -m tests.fake_upstream PORT [--models a,b] [--models-delay S]`
(`--models`: the model ids `GET /v1/models` lists, `fake-model` / `claude-fake` by default;
`--models-delay`: seconds before that list is answered, a slow server). It serves:

- `POST /v1/chat/completions`: OpenAI Chat Completions, as Ollama's `/v1`, vLLM and OpenAI speak.
- `POST /v1/messages`: Anthropic Messages, as the `anthropic` SDK (and pydantic-ai's
  AnthropicModel) calls it, stream (`event:` SSE) and non-stream.
- `GET /v1/models`: Anthropic's shape when the request carries `anthropic-version`, else OpenAI's.
- `GET /_requests`: every chat and messages request received, in order, as
  `{"path", "body", "headers"}`; `DELETE /_requests` forgets them (and the `fail` counts).

What it answers is steered by a directive in the last user message (for Anthropic, the last one
that holds more than `tool_result` blocks), so tests drive it through HAIA like a real user would:

    #fake tokens=40 delay=0.01 first=0.5 status=429 retry_after=2 cut=5 hang garbage
    #fake status=503 fail=2     (the first 2 requests with this text fail, later ones succeed)
    #fake think=3 field=reasoning call=2 finish=length midfail=4
    #fake tokens=40 rate=20     (20 tokens/s on a fixed schedule: a late tick does not slow the
                                 rest, as `delay` would; for load benchmarks)

- `tokens=N`: answer `tok0 tok1 …` (N content deltas) instead of the echo.
- `delay=S`: seconds between deltas (of every kind); `first=S`: seconds before the answer.
- `status=N` (with `retry_after=S`): fail with that status, in the wire's error shape (OpenAI:
  `{"error": {...}}`; Anthropic: `{"type": "error", "error": {...}, "request_id"}`, with the
  error type Anthropic uses for that status); `fail=K`: only the first K such requests fail
  (counted per wire).
- `echo_key` (with `status=` or `midfail=`): the error message carries the request's API key,
  as a careless server's would.
- `cut=N`: drop the connection after N content deltas; `hang`: never answer; `garbage`: answer
  an HTML page.
- `midfail=N`: after N content deltas, an error inside the stream (OpenAI: a `data: {"error":
  ...}` chunk then `[DONE]`, as vLLM does; Anthropic: `event: error`), then the stream ends.
- `think=N`: N reasoning deltas `think0 `, `think1 `, … before the content. OpenAI wire:
  `reasoning_content` (vLLM/DeepSeek style), or `reasoning` with `field=reasoning` (Ollama's
  style); Anthropic wire: a `thinking` block with the signature `sig-fake-<N>`.
- `call=N`: the model calls the first N tools the request declares (parallel when N > 1), with
  the arguments `{"query": "tok <i>", "n": <i>}` streamed in pieces; ids `call_fake_<i>`
  (OpenAI) / `toolu_fake_<i>` (Anthropic); finish `tool_calls` / `tool_use`. No text unless
  `tokens=` is given too. Fewer declared tools than N is a 400, as a real server answers. Once
  tool results follow the user's message, the model does not call again: it answers.
- `overflow` (OpenAI wire): a 400 `context_length_exceeded`, as a server whose context window
  the conversation outgrew answers.
- `only=MODEL`: every other directive applies only to requests for that model (as named in
  the request's `model`); requests for other models get the plain echo. For fallbacks: one
  server of an alias fails, the next answers.
- `finish=length`: finish reason `length` (Anthropic `max_tokens`) instead of `stop`/`end_turn`.

Without `tokens=` it answers "Echo: <the user's text>" word by word; with image parts in that
message (`image_url` parts / `image` blocks) "Echo: <text> [images: K]", and when tool results
follow it "… [tool results: K]", so a test sees what reached the model. Usage counts every
delta (reasoning, content, argument pieces); OpenAI streams send it in a last `choices: []` chunk
only with `stream_options.include_usage`. `/v1/messages` without `max_tokens` is a 400, as there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sanic import HTTPResponse, Request, Sanic
from sanic.response import json as json_response

_DIRECTIVE = re.compile(r"#fake((?:\s+\w+(?:=[\w.:-]+)?)*)")

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
ANTHROPIC_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
MIDFAIL_MESSAGE = "fake mid-stream failure"


def directives(text: str) -> dict[str, str]:
    match = _DIRECTIVE.search(text)
    if match is None:
        return {}
    pairs = (item.partition("=") for item in match.group(1).split())
    return {key: value or "1" for key, _, value in pairs}


def _texts(content: Any) -> list[str]:
    """The text of a message's content: a string, or the text parts/blocks of a list."""
    if isinstance(content, list):
        return [
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type", "text") == "text"
        ]
    return [str(content or "")]


def _count(content: Any, kind: str) -> int:
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if isinstance(part, dict) and part.get("type") == kind)


@dataclass
class Turn:
    """What the model is asked: the last user text, its images, tool results after it, tools."""

    text: str = ""
    images: int = 0
    tool_results: int = 0
    tools: list[str] = field(default_factory=list)


def openai_turn(body: dict[str, Any]) -> Turn:
    turn = Turn()
    for tool in body.get("tools") or []:
        turn.tools.append(str((tool.get("function") or {}).get("name", "")))
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "tool":
            turn.tool_results += 1
        elif message.get("role") == "user":
            turn.text = " ".join(_texts(message.get("content")))
            turn.images = _count(message.get("content"), "image_url")
            break
    return turn


def anthropic_turn(body: dict[str, Any]) -> Turn:
    turn = Turn(tools=[str(tool.get("name", "")) for tool in body.get("tools") or []])
    for message in reversed(body.get("messages") or []):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        turn.tool_results += _count(content, "tool_result")
        if _count(content, "tool_result") < (len(content) if isinstance(content, list) else 1):
            turn.text = " ".join(_texts(content))
            turn.images = _count(content, "image")
            break
    return turn


def reply_tokens(
    text: str, options: dict[str, str], images: int = 0, tool_results: int = 0
) -> list[str]:
    if text.lstrip().startswith("### Task:") and "title" in text.lower():
        return ['{"title": ', '"Homelab ', 'Chat"}']
    if "tokens" in options:
        return [f"tok{i} " for i in range(int(options["tokens"]))]
    answer = f"Echo: {_DIRECTIVE.sub('', text).strip()}"
    if images:
        answer += f" [images: {images}]"
    if tool_results:
        answer += f" [tool results: {tool_results}]"
    words = answer.split(" ")
    return [word if i == 0 else f" {word}" for i, word in enumerate(words)]


def _pieces(text: str, count: int = 4) -> list[str]:
    size = -(-len(text) // count)
    return [text[i : i + size] for i in range(0, len(text), size)]


@dataclass
class Call:
    index: int
    name: str

    @property
    def arguments(self) -> str:
        return json.dumps({"query": f"tok {self.index}", "n": self.index})

    @property
    def input(self) -> dict[str, Any]:
        return dict(json.loads(self.arguments))


@dataclass
class Plan:
    """What the fake model answers, whatever the wire."""

    options: dict[str, str]
    reasoning: list[str]
    calls: list[Call]
    tokens: list[str]
    finish: str
    sent: int = 0
    started: float | None = None

    @property
    def delay(self) -> float:
        return float(self.options.get("delay", 0))

    @property
    def output_tokens(self) -> int:
        pieces = sum(len(_pieces(call.arguments)) for call in self.calls)
        return len(self.reasoning) + len(self.tokens) + pieces

    async def pause(self) -> None:
        rate = float(self.options.get("rate", 0))
        if rate:  # a fixed schedule from the first piece on
            loop = asyncio.get_running_loop()
            if self.started is None:
                self.started = loop.time()
            self.sent += 1
            await asyncio.sleep(max(0.0, self.started + self.sent / rate - loop.time()))
        elif self.delay:
            await asyncio.sleep(self.delay)


def make_plan(turn: Turn, options: dict[str, str]) -> Plan | str:
    """The answer to a turn, or why the request is invalid."""
    wanted = int(options.get("call", 0)) if turn.tool_results == 0 else 0
    if wanted > len(turn.tools):
        return f"fake: call={wanted} but the request declares {len(turn.tools)} tools"
    calls = [Call(i, name) for i, name in enumerate(turn.tools[:wanted])]
    if calls and "tokens" not in options:
        tokens = []
    else:
        tokens = reply_tokens(turn.text, options, turn.images, turn.tool_results)
    reasoning = [f"think{i} " for i in range(int(options.get("think", 0)))]
    finish = options.get("finish") or ("tool_calls" if calls else "stop")
    return Plan(options, reasoning, calls, tokens, finish)


def _prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages") or []
    return (
        sum(len(str(m.get("content", ""))) // 4 for m in messages)
        + len(str(body.get("system", ""))) // 4
    )


def create_app(model_ids: list[str] | None = None, models_delay: float = 0.0) -> Sanic[Any, Any]:
    app = Sanic("fake_upstream")
    app.ctx.requests = []
    app.ctx.failures = {}
    app.ctx.models = model_ids
    app.ctx.models_delay = models_delay
    app.add_route(models, "/v1/models", methods=["GET"])
    app.add_route(recorded, "/_requests", methods=["GET"])
    app.add_route(forget, "/_requests", methods=["DELETE"], name="forget")
    app.add_route(chat, "/v1/chat/completions", methods=["POST"])
    app.add_route(messages, "/v1/messages", methods=["POST"])
    return app


async def models(request: Request) -> HTTPResponse:
    await asyncio.sleep(request.app.ctx.models_delay)
    listed: list[str] | None = request.app.ctx.models
    if "anthropic-version" not in request.headers:
        data = [{"id": name, "object": "model"} for name in listed or ["fake-model"]]
        return json_response({"object": "list", "data": data})
    names = listed or ["claude-fake"]
    cards = [
        {
            "type": "model",
            "id": name,
            "display_name": name.replace("-", " ").title(),
            "created_at": "2025-01-01T00:00:00Z",
        }
        for name in names
    ]
    return json_response(
        {"data": cards, "has_more": False, "first_id": names[0], "last_id": names[-1]}
    )


async def recorded(request: Request) -> HTTPResponse:
    return json_response(request.app.ctx.requests)


async def forget(request: Request) -> HTTPResponse:
    request.app.ctx.requests.clear()
    request.app.ctx.failures.clear()
    return json_response({})


def received(request: Request, turn: Turn, wire: str) -> dict[str, str]:
    """Records the request and returns its directives, `status` dropped past `fail`."""
    request.app.ctx.requests.append(
        {"path": request.path, "body": request.json, "headers": dict(request.headers)}
    )
    options = directives(turn.text)
    if "only" in options and options["only"] != str((request.json or {}).get("model")):
        options = {}
    failures = request.app.ctx.failures
    key = turn.text if wire == "openai" else f"{wire}:{turn.text}"
    failures[key] = failures.get(key, 0) + 1
    if "fail" in options and failures[key] > int(options["fail"]):
        options.pop("status", None)
    return options


def _failure(status: int, request: Request, options: dict[str, str]) -> str:
    """The error message; with `echo_key`, the credentials the request carried in it, as a
    careless server would (HAIA must not pass them on to a log or a client)."""
    if "echo_key" not in options:
        return f"fake error {status}"
    key = request.headers.get("x-api-key") or request.headers.get("authorization", "")
    return f"fake error {status}: Incorrect API key provided: {key}"


def _midfail_message(request: Request, options: dict[str, str]) -> str:
    if "echo_key" not in options:
        return MIDFAIL_MESSAGE
    key = request.headers.get("x-api-key") or request.headers.get("authorization", "")
    return f"{MIDFAIL_MESSAGE} (Incorrect API key provided: {key})"


async def chat(request: Request) -> HTTPResponse | None:
    body = request.json
    turn = openai_turn(body)
    options = received(request, turn, "openai")
    if "garbage" in options:
        return _garbage()
    if "overflow" in options:
        return _openai_error(
            "This model's maximum context length is 8192 tokens; the messages are longer.",
            "invalid_request_error",
            400,
            {},
            param="messages",
            code="context_length_exceeded",
        )
    if "status" in options:
        status = int(options["status"])
        kind = "overloaded_error" if status == 529 else "api_error"
        return _openai_error(_failure(status, request, options), kind, status, options)
    plan = make_plan(turn, options)
    if isinstance(plan, str):
        return _openai_error(plan, "invalid_request_error", 400, {}, param="tools")
    await _before_answer(options)
    usage: dict[str, Any] = {
        "prompt_tokens": _prompt_tokens(body),
        "completion_tokens": plan.output_tokens,
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if plan.reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": len(plan.reasoning)}
    ident = f"chatcmpl-fake{time.time_ns()}"
    if not body.get("stream"):
        return json_response(_openai_completion(body, plan, usage, ident))
    await _openai_stream(request, body, plan, usage, ident)
    return None


async def messages(request: Request) -> HTTPResponse | None:
    body = request.json
    turn = anthropic_turn(body)
    options = received(request, turn, "anthropic")
    if "garbage" in options:
        return _garbage()
    if "status" in options:
        status = int(options["status"])
        kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        return _anthropic_error(_failure(status, request, options), kind, status, options)
    missing = [name for name in ("model", "max_tokens", "messages") if name not in body]
    if missing:
        return _anthropic_error(f"{missing[0]}: Field required", "invalid_request_error", 400, {})
    plan = make_plan(turn, options)
    if isinstance(plan, str):
        return _anthropic_error(plan, "invalid_request_error", 400, {})
    await _before_answer(options)
    ident = f"msg_fake{time.time_ns()}"
    if not body.get("stream"):
        return json_response(_anthropic_message(body, plan, ident), headers=_REQUEST_ID)
    await _anthropic_stream(request, body, plan, ident)
    return None


async def _before_answer(options: dict[str, str]) -> None:
    if "hang" in options:
        await asyncio.sleep(3600)
    await asyncio.sleep(float(options.get("first", 0)))


def _garbage() -> HTTPResponse:
    return HTTPResponse("<html>this is not an LLM</html>", content_type="text/html")


def _retry_after(options: dict[str, str]) -> dict[str, str]:
    return {"retry-after": options["retry_after"]} if "retry_after" in options else {}


# --- OpenAI Chat Completions ----------------------------------------------------------------


def _openai_error(
    message: str,
    kind: str,
    status: int,
    options: dict[str, str],
    param: str | None = None,
    code: str | None = None,
) -> HTTPResponse:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return json_response({"error": error}, status=status, headers=_retry_after(options))


def _openai_completion(
    body: dict[str, Any], plan: Plan, usage: dict[str, Any], ident: str
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(plan.tokens)}
    if plan.reasoning:
        message[plan.options.get("field", "reasoning_content")] = "".join(plan.reasoning)
    if plan.calls:
        message["content"] = message["content"] or None
        message["tool_calls"] = [
            {
                "id": f"call_fake_{call.index}",
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in plan.calls
        ]
    return {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": plan.finish}],
        "usage": usage,
    }


async def _openai_stream(
    request: Request, body: dict[str, Any], plan: Plan, usage: dict[str, Any], ident: str
) -> None:
    created, model = int(time.time()), body["model"]
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    response = await request.respond(content_type="text/event-stream")

    async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
        chunk = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **({"usage": None} if include_usage else {}),
            **extra,
        }
        await response.send(f"data: {json.dumps(chunk)}\n\n")

    async def delta(fields: dict[str, Any]) -> None:
        await send([{"index": 0, "delta": fields, "finish_reason": None}])
        await plan.pause()

    await send([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
    reasoning_field = plan.options.get("field", "reasoning_content")
    for piece in plan.reasoning:
        await delta({reasoning_field: piece})
    if not await _content(plan, request, lambda token: delta({"content": token})):
        return
    if "midfail" in plan.options:
        message = _midfail_message(request, plan.options)
        error = {"message": message, "type": "api_error", "param": None, "code": None}
        await response.send(f"data: {json.dumps({'error': error})}\n\n")
        await response.send("data: [DONE]\n\n")
        await response.eof()
        return
    for call in plan.calls:
        function = {"name": call.name, "arguments": ""}
        start = {"index": call.index, "id": f"call_fake_{call.index}", "type": "function"}
        await delta({"tool_calls": [{**start, "function": function}]})
        for piece in _pieces(call.arguments):
            await delta({"tool_calls": [{"index": call.index, "function": {"arguments": piece}}]})
    await send([{"index": 0, "delta": {}, "finish_reason": plan.finish}])
    if include_usage:
        await send([], usage=usage)
    await response.send("data: [DONE]\n\n")
    await response.eof()


async def _content(plan: Plan, request: Request, send: Callable[[str], Awaitable[None]]) -> bool:
    """Sends the content deltas (up to `midfail`); False when `cut` dropped the connection."""
    limit = int(plan.options.get("midfail", len(plan.tokens)))
    cut = int(plan.options.get("cut", -1))
    for i, token in enumerate(plan.tokens[:limit]):
        if i == cut:
            request.transport.close()
            return False
        await send(token)
    return True


# --- Anthropic Messages ---------------------------------------------------------------------

_REQUEST_ID = {"request-id": "req_fake"}


def _anthropic_error(message: str, kind: str, status: int, options: dict[str, str]) -> HTTPResponse:
    return json_response(
        _anthropic_error_body(message, kind),
        status=status,
        headers={**_retry_after(options), **_REQUEST_ID},
    )


def _anthropic_error_body(message: str, kind: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"}


def _anthropic_message(body: dict[str, Any], plan: Plan, ident: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if plan.reasoning:
        signature = f"sig-fake-{len(plan.reasoning)}"
        content.append(
            {"type": "thinking", "thinking": "".join(plan.reasoning), "signature": signature}
        )
    if plan.tokens:
        content.append({"type": "text", "text": "".join(plan.tokens)})
    for call in plan.calls:
        content.append(
            {
                "type": "tool_use",
                "id": f"toolu_fake_{call.index}",
                "name": call.name,
                "input": call.input,
            }
        )
    return {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": content,
        "stop_reason": ANTHROPIC_STOP_REASONS.get(plan.finish, plan.finish),
        "stop_sequence": None,
        "usage": {"input_tokens": _prompt_tokens(body), "output_tokens": plan.output_tokens},
    }


class _AnthropicStream:
    """Sends `event: <type>` SSE events and numbers the content blocks."""

    def __init__(self, request: Request, plan: Plan) -> None:
        self.request, self.plan, self.index = request, plan, -1
        self.response: Any = None

    async def event(self, kind: str, data: dict[str, Any]) -> None:
        if self.response is None:
            self.response = await self.request.respond(
                content_type="text/event-stream", headers=_REQUEST_ID
            )
        await self.response.send(f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n")

    async def start(self, block: dict[str, Any]) -> None:
        self.index += 1
        await self.event("content_block_start", {"index": self.index, "content_block": block})

    async def delta(self, delta: dict[str, Any]) -> None:
        await self.event("content_block_delta", {"index": self.index, "delta": delta})
        await self.plan.pause()

    async def stop(self) -> None:
        await self.event("content_block_stop", {"index": self.index})

    async def end(self) -> None:
        if self.response is not None:
            await self.response.eof()


async def _anthropic_stream(request: Request, body: dict[str, Any], plan: Plan, ident: str) -> None:
    sse = _AnthropicStream(request, plan)
    message = {**_anthropic_message(body, plan, ident), "content": [], "stop_reason": None}
    message["usage"] = {"input_tokens": _prompt_tokens(body), "output_tokens": 1}
    await sse.event("message_start", {"message": message})
    await sse.event("ping", {})
    if plan.reasoning:
        await sse.start({"type": "thinking", "thinking": "", "signature": ""})
        for piece in plan.reasoning:
            await sse.delta({"type": "thinking_delta", "thinking": piece})
        await sse.delta({"type": "signature_delta", "signature": f"sig-fake-{len(plan.reasoning)}"})
        await sse.stop()
    if plan.tokens:
        await sse.start({"type": "text", "text": ""})
        if not await _content(
            plan, request, lambda t: sse.delta({"type": "text_delta", "text": t})
        ):
            return
    if "midfail" in plan.options:
        failure = _midfail_message(request, plan.options)
        await sse.event("error", _anthropic_error_body(failure, "api_error"))
        await sse.end()
        return
    if plan.tokens:
        await sse.stop()
    for call in plan.calls:
        await sse.start(
            {"type": "tool_use", "id": f"toolu_fake_{call.index}", "name": call.name, "input": {}}
        )
        for piece in _pieces(call.arguments):
            await sse.delta({"type": "input_json_delta", "partial_json": piece})
        await sse.stop()
    stop_reason = ANTHROPIC_STOP_REASONS.get(plan.finish, plan.finish)
    await sse.event(
        "message_delta",
        {
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": plan.output_tokens},
        },
    )
    await sse.event("message_stop", {})
    await sse.end()


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_upstream")
    parser.add_argument("port", type=int)
    parser.add_argument("--models", default="", help="model ids /v1/models lists, comma-separated")
    parser.add_argument("--models-delay", type=float, default=0.0, help="seconds before the list")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = _arguments()
    fake = create_app(
        [name for name in arguments.models.split(",") if name] or None, arguments.models_delay
    )
    fake.run(
        host="127.0.0.1",
        port=arguments.port,
        single_process=True,
        access_log=False,
        motd=False,
        backlog=4096,  # load benchmarks open 1,000 connections at once; Sanic's default is 100
    )
