"""Wire schema of `POST /v1/responses`, and its translation onto HAIA's one generation core.

A Responses request becomes what a chat turn is for the worker: chat-shaped messages (stored as
the conversation's turns), the job's options (tools, sampling, formats, as
`ChatCompletionRequest.options()` builds them) and the request's metadata (what the response
object echoes back, and what the encoder needs: the tools' namespaces, whether reasoning goes
out as a summary). Nothing here runs per token.
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from app.errors import InvalidRequest
from app.schemas import ChatCompletionRequest, ChatMessage, ReasoningEffort, StrictFloat

_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})
_SKIPPED_ITEMS = frozenset({"reasoning", "item_reference", "compaction", "compaction_summary"})


_EFFORTS: frozenset[str] = frozenset(get_args(ReasoningEffort))


class Reasoning(BaseModel):
    """`reasoning`: values a model cannot take are accepted and not passed on (newer clients
    send newer ones)."""

    model_config = ConfigDict(extra="allow")

    effort: str | None = None
    summary: str | None = None

    @property
    def wants_summary(self) -> bool:
        return self.summary not in (None, "", "none")


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(BaseModel):
    """`POST /v1/responses`. Unknown fields are accepted; `include` values HAIA cannot fill are
    ignored."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str | None = None
    input: str | list[dict[str, Any]] = Field(default_factory=list)
    instructions: str | list[dict[str, Any]] | None = None
    previous_response_id: str | None = Field(default=None, max_length=100)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    reasoning: Reasoning | None = None
    text: TextConfig | None = None
    max_output_tokens: StrictInt | None = Field(default=None, ge=1)
    max_tool_calls: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, ge=0, le=1)
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    metadata: dict[str, str] | None = None
    store: StrictBool = True
    background: StrictBool = False
    stream: StrictBool = False
    include: list[str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None

    # -- the input, as chat messages -------------------------------------------------------

    def items(self) -> list[dict[str, Any]]:
        """The input as a list of items (a string is one user message)."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return self.input

    def instruction_text(self) -> str | None:
        if self.instructions is None or isinstance(self.instructions, str):
            return self.instructions or None
        texts = [_text_of(item.get("content")) for item in self.instructions]
        return "\n".join(text for text in texts if text) or None

    def chat_messages(self) -> list[ChatMessage]:
        """The input items as chat messages: function calls join the assistant message before
        them, their outputs become `tool` messages, reasoning items are not sent back."""
        messages: list[ChatMessage] = []
        for index, item in enumerate(self.items()):
            converted = _message_of(item, index)
            if converted is None:
                continue
            last = messages[-1] if messages else None
            if (
                converted.role == "assistant"
                and converted.tool_calls
                and last is not None
                and last.role == "assistant"
            ):
                last.tool_calls = [*(last.tool_calls or []), *converted.tool_calls]
                continue
            messages.append(converted)
        return messages

    # -- what the model receives beyond the messages ---------------------------------------

    def options(self) -> dict[str, Any]:
        """The job's options, built exactly as a chat completion's are."""
        chat: dict[str, Any] = {"messages": [{"role": "user", "content": ""}]}
        tools = function_tools(self.tools)
        if tools:
            chat["tools"] = [
                {
                    "type": "function",
                    "function": {
                        key: tool[key]
                        for key in ("name", "description", "parameters", "strict")
                        if tool.get(key) is not None
                    },
                }
                for tool in tools
            ]
            choice = self._tool_choice()
            if choice is not None:
                chat["tool_choice"] = choice
            if self.parallel_tool_calls is not None:
                chat["parallel_tool_calls"] = self.parallel_tool_calls
        for name in ("temperature", "top_p"):
            if getattr(self, name) is not None:
                chat[name] = getattr(self, name)
        if self.max_output_tokens is not None:
            chat["max_tokens"] = self.max_output_tokens
        if self.reasoning is not None and self.reasoning.effort in _EFFORTS:
            chat["reasoning_effort"] = self.reasoning.effort
        chat.update(self._chat_names(chat))
        response_format = self._response_format()
        if response_format is not None:
            chat["response_format"] = response_format
        try:
            request = ChatCompletionRequest.model_validate(chat)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            raise InvalidRequest(
                f"Invalid request: {str(error['msg']).removeprefix('Value error, ')}",
                param="tools",
            ) from None
        options = request.options()
        options["responses"] = {"instructions": self.instruction_text()}
        return options

    def _chat_names(self, chat: dict[str, Any]) -> dict[str, Any]:
        """`reasoning_effort` and `seed` under their chat completions names, as OpenWebUI's
        Responses connection sends its chat's parameters: passed on where valid (a
        `reasoning.effort` wins), else accepted and left out like any unknown field."""
        extra = self.model_extra or {}
        found: dict[str, Any] = {}
        effort = extra.get("reasoning_effort")
        if "reasoning_effort" not in chat and isinstance(effort, str) and effort in _EFFORTS:
            found["reasoning_effort"] = effort
        seed = extra.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool) and abs(seed) < 2**63:
            found["seed"] = seed
        return found

    def _tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            return choice if choice in ("none", "auto", "required") else None
        kind = choice.get("type")
        if kind == "function" and choice.get("name"):
            name = flat_name(choice.get("namespace"), str(choice["name"]))
            return {"type": "function", "function": {"name": name}}
        if kind == "allowed_tools" and choice.get("mode") in ("auto", "required"):
            return str(choice["mode"])
        return None  # a hosted tool's choice: the model is free

    def _response_format(self) -> dict[str, Any] | None:
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "json_object"}
        schema: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema_ or {}}
        if fmt.description is not None:
            schema["description"] = fmt.description
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        return {"type": "json_schema", "json_schema": schema}

    # -- what the response object echoes ---------------------------------------------------

    def meta(self, *, response_id: str, model: str, created_at: int) -> dict[str, Any]:
        """The request's metadata: the fields every response object carries, and what the
        encoder needs (`namespaces`, `summary`). Stored with the response."""
        fmt: dict[str, Any] = {"type": "text"}
        if self.text is not None and self.text.format is not None:
            fmt = self.text.format.model_dump(by_alias=True, exclude_none=True)
            if fmt.get("type") == "json_schema":  # the spec requires both, null allowed
                fmt = {"description": None, "strict": False, **fmt}
        reasoning = None
        if self.reasoning is not None:
            reasoning = {"effort": self.reasoning.effort, "summary": self.reasoning.summary}
        text: dict[str, Any] = {"format": fmt}
        if self.text is not None and self.text.verbosity is not None:
            text["verbosity"] = self.text.verbosity
        return {
            "id": response_id,
            "created_at": created_at,
            "model": model,
            "instructions": self.instruction_text(),
            "previous_response_id": self.previous_response_id,
            "tools": [
                {
                    "type": "function",
                    # as the client declared it: calls come back under that name too
                    "name": tool["original"],
                    **({"namespace": tool["namespace"]} if tool.get("namespace") else {}),
                    "description": tool.get("description"),
                    "parameters": tool.get("parameters"),
                    "strict": tool.get("strict"),
                }
                for tool in function_tools(self.tools)
            ],
            "tool_choice": self.tool_choice if self.tool_choice is not None else "auto",
            "parallel_tool_calls": (
                True if self.parallel_tool_calls is None else self.parallel_tool_calls
            ),
            "text": text,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_logprobs": self.top_logprobs or 0,
            "reasoning": reasoning,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": self.max_tool_calls,
            "store": self.store,
            "background": self.background,
            "metadata": self.metadata or {},
            "safety_identifier": self.safety_identifier,
            "prompt_cache_key": self.prompt_cache_key,
            "service_tier": self.service_tier or "default",
            "user": self.user,
            "namespaces": {
                tool["name"]: [tool["namespace"], tool["original"]]
                for tool in function_tools(self.tools)
                if tool.get("namespace")
            },
            "summary": bool(self.reasoning is not None and self.reasoning.wants_summary),
        }

    def unsupported_part(self) -> tuple[str, str] | None:
        """(param, type) of the first input content part no model can take, if any."""
        for index, item in enumerate(self.items()):
            content = item.get("content")
            if item.get("type", "message") != "message" or not isinstance(content, list):
                continue
            for position, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                param = f"input[{index}].content[{position}]"
                if kind in _TEXT_PARTS or kind == "refusal":
                    continue
                if kind == "input_image":
                    url = part.get("image_url")
                    if not isinstance(url, str) or not url.startswith(
                        ("data:image/", "http://", "https://")
                    ):
                        return f"{param}.image_url", "input_image"
                    continue
                return f"{param}.type", str(kind)
        return None

    def is_task(self) -> bool:
        """An OpenWebUI background task (`### Task:`), asked over a Responses connection."""
        if self.stream or self.previous_response_id:
            return False
        messages = [i for i in self.items() if i.get("type", "message") == "message"]
        if len(messages) != 1 or messages[0].get("role") != "user":
            return False
        return _text_of(messages[0].get("content")).lstrip().startswith("### Task:")


def flat_name(namespace: str | None, name: str) -> str:
    """The name a namespace's function has for the model (names allow no dots upstream)."""
    if not namespace:
        return name
    return f"{namespace}{name}" if namespace.endswith("_") else f"{namespace}__{name}"


def function_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The request's function tools, namespaces flattened (`namespace`, `original` kept);
    hosted tools are left out."""
    found: list[dict[str, Any]] = []
    for tool in tools or ():
        kind = tool.get("type")
        if kind == "function" and isinstance(tool.get("name"), str) and tool["name"]:
            found.append({**tool, "original": tool["name"]})
        elif kind == "namespace":
            namespace = str(tool.get("name") or "")
            for inner in tool.get("tools") or ():
                if not isinstance(inner, dict) or inner.get("type", "function") != "function":
                    continue
                if not isinstance(inner.get("name"), str) or not inner["name"]:
                    continue
                found.append(
                    {
                        **inner,
                        "name": flat_name(namespace, str(inner["name"])),
                        "namespace": namespace,
                        "original": inner["name"],
                    }
                )
    return found


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text") or "")
            for part in content
            if isinstance(part, dict) and part.get("type") in _TEXT_PARTS
        )
    return ""


def _parts(content: Any) -> str | list[dict[str, Any]]:
    """Message content as chat content: a string, or text and image_url parts."""
    if not isinstance(content, list):
        return _text_of(content)
    images = [p for p in content if isinstance(p, dict) and p.get("type") == "input_image"]
    if not images:
        return _text_of(content)
    parts: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") in _TEXT_PARTS:
            parts.append({"type": "text", "text": str(part.get("text") or "")})
        elif part.get("type") == "input_image":
            image: dict[str, Any] = {"url": part.get("image_url")}
            if part.get("detail") in ("auto", "low", "high"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
    return parts


def _message_of(item: dict[str, Any], index: int) -> ChatMessage | None:
    kind = item.get("type", "message")
    try:
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(
                    f"input[{index}].role must be user, assistant, system or developer.",
                    param=f"input[{index}].role",
                )
            return ChatMessage.model_validate(
                {"role": role, "content": _parts(item.get("content"))}
            )
        if kind == "function_call":
            name = flat_name(item.get("namespace"), str(item.get("name") or ""))
            call = {
                "id": str(item.get("call_id") or item.get("id") or f"call_{index}"),
                "type": "function",
                "function": {"name": name, "arguments": str(item.get("arguments") or "")},
            }
            return ChatMessage.model_validate(
                {"role": "assistant", "content": None, "tool_calls": [call]}
            )
        if kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output)
            if not isinstance(output, str | list):
                text = json.dumps(output)
            return ChatMessage.model_validate(
                {"role": "tool", "tool_call_id": str(item.get("call_id") or ""), "content": text}
            )
    except ValidationError as exc:
        raise InvalidRequest(
            f"input[{index}] is not a valid {kind} item.", param=f"input[{index}]"
        ) from exc
    if kind in _SKIPPED_ITEMS:
        return None
    return None  # hosted tools' calls and outputs: the model never had those tools


# -- documentation models (the OpenAPI description; the routes build plain dicts) -------------


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(BaseModel):
    """A response (`object: "response"`): the body of `POST /v1/responses`, of `GET`, and the
    `response` of every lifecycle event. Every field of the Open Responses `ResponseResource`
    is present."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["response"]
    created_at: int
    completed_at: int | None
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    background: bool
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: int | None
    model: str
    output: list[dict[str, Any]]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: dict[str, Any] | None
    safety_identifier: str | None
    prompt_cache_key: str | None
    service_tier: str
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_logprobs: int
    top_p: float
    presence_penalty: float
    frequency_penalty: float
    truncation: Literal["disabled"]
    usage: ResponseUsage | None
    user: str | None
    metadata: dict[str, str]
    conversation: dict[str, str] | None


class InputItemList(BaseModel):
    """`GET /v1/responses/{id}/input_items`: the input items, each with its `id`."""

    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"]
    deleted: bool
