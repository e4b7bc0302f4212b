"""Wire schemas: the OpenAI Chat Completions format as HAIA reads and writes it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

StrictFloat = Annotated[float, Strict()]
"""A JSON number (an integer too), never a boolean."""

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(BaseModel):
    """One element of an array `content`: `text` or `image_url` (what models take)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    arguments: str = ""


class ToolCall(BaseModel):
    """An assistant's call of a client tool, as OpenAI writes it."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1, max_length=200)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(default=None, max_length=200)

    @property
    def text(self) -> str:
        """The message's text: a string content, or its text parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if part.text is not None)

    @property
    def images(self) -> list[ImageURL]:
        if not isinstance(self.content, list):
            return []
        return [part.image_url for part in self.content if part.image_url is not None]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = False


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionCall | dict[str, str]

    @property
    def name(self) -> str:
        function = self.function
        return function.name if isinstance(function, FunctionCall) else function.get("name", "")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


MAX_OUTPUT_TOKENS = 1_000_000
"""The largest `max_tokens` / `max_completion_tokens` accepted (no model writes more)."""

ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]

_SUPPORTED_PARTS = ("text", "image_url")
_PASS_THROUGH = {
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning_effort",
    "user",
}
"""Fields an OpenAI-compatible upstream receives exactly as the client sent them."""


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`. Every documented field is accepted; those the model can act
    on reach it (see `options()`)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    # Strict: `true` is not a number nor `1` a boolean, as in OpenAI's own validation.
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, ge=0, le=1)
    # Passed on to the model, never used to size anything of HAIA's own; bounded so an absurd
    # value is a 400 here rather than an overflow in an upstream.
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    user: str | None = Field(default=None, max_length=256)
    n: StrictInt | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None

    @field_validator("n")
    @classmethod
    def _single_choice(cls, value: int | None) -> int | None:
        if value is not None and value > 1:
            raise ValueError("HAIA generates one choice per request; n must be 1")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    @model_validator(mode="after")
    def _ends_with_a_turn(self) -> ChatCompletionRequest:
        if self.messages[-1].role not in ("user", "tool"):
            raise ValueError("the last message must have role 'user' or 'tool'")
        return self

    def tool_result_problem(self, *, continues: bool) -> tuple[str, str] | None:
        """(param, message) for a `tool` message that answers no call, if any.

        A call is declared by an earlier assistant message's `tool_calls` in the request; a
        request that continues a stored conversation may answer a stored call instead.
        """
        declared: set[str] = set()
        seen_assistant = False
        for index, message in enumerate(self.messages):
            if message.role == "assistant":
                seen_assistant = True
                declared.update(call.id for call in message.tool_calls or ())
            if message.role != "tool":
                continue
            if not message.tool_call_id:
                return f"messages[{index}].tool_call_id", "a tool message needs its tool_call_id"
            if message.tool_call_id in declared or (continues and not seen_assistant):
                continue
            return (
                f"messages[{index}].tool_call_id",
                f"no earlier assistant message calls a tool with id {message.tool_call_id!r}",
            )
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported_part(self) -> tuple[str, str] | None:
        """(param, type) of the first content part no model can take, if any."""
        for index, message in enumerate(self.messages):
            if not isinstance(message.content, list):
                continue
            for position, part in enumerate(message.content):
                param = f"messages[{index}].content[{position}]"
                if part.type not in _SUPPORTED_PARTS:
                    return f"{param}.type", part.type
                if part.type == "image_url" and (
                    part.image_url is None
                    or not part.image_url.url.startswith(("data:image/", "http://", "https://"))
                ):
                    return f"{param}.image_url", "image_url"
                if part.type == "text" and part.text is None:
                    return f"{param}.text", "text"
        return None

    def options(self) -> dict[str, Any]:
        """What the model receives beyond the messages, as plain data for the job."""
        options: dict[str, Any] = {"sampling": self.sampling()}
        if self.tools:
            options["tools"] = [
                {
                    "name": tool.function.name,
                    "description": tool.function.description,
                    "parameters": tool.function.parameters,
                    "strict": tool.function.strict,
                }
                for tool in self.tools
            ]
        if self.tool_choice is not None:
            choice = self.tool_choice
            options["tool_choice"] = choice if isinstance(choice, str) else {"name": choice.name}
        if self.parallel_tool_calls is not None:
            options["parallel_tool_calls"] = self.parallel_tool_calls
        if self.response_format is not None and self.response_format.type != "text":
            options["response_format"] = self.response_format.model_dump(exclude_none=True)
        if self.reasoning_effort is not None:
            options["reasoning_effort"] = self.reasoning_effort
        if self.user is not None:
            options["user"] = self.user
        options["openai"] = self.model_dump(include=_PASS_THROUGH, exclude_none=True)
        return options

    def sampling(self) -> dict[str, Any]:
        """The sampling settings the model receives (pydantic-ai `ModelSettings` keys)."""
        settings: dict[str, Any] = {}
        for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None:
                settings[name] = value
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None:
            settings["max_tokens"] = max_tokens
        if self.stop is not None:
            settings["stop_sequences"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.logit_bias:
            settings["logit_bias"] = {key: int(value) for key, value in self.logit_bias.items()}
        return settings


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int | None, completion_tokens: int | None) -> Usage | None:
        """The usage of stored counts, or None when nothing was counted."""
        if prompt_tokens is None and completion_tokens is None:
            return None
        prompt, completion = prompt_tokens or 0, completion_tokens or 0
        return cls(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    system_fingerprint: None = None


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str = ""


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Timings(BaseModel):
    created_at: datetime
    started_at: datetime | None = None
    first_token_at: datetime | None = None
    finished_at: datetime | None = None


class StoredCompletion(BaseModel):
    """`GET /v1/chat/completions/{id}`: a completion as stored, with where it stands."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    status: str
    conversation_id: str
    choices: list[Choice]
    usage: Usage | None = None
    timings: Timings
    error: ErrorDetail | None = None


class ConversationSummary(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    title: str
    message_count: int
    created_at: datetime
    updated_at: datetime
    parent_id: str | None = None


class ConversationPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[ConversationSummary]
    first_id: str | None
    last_id: str | None
    has_more: bool


class StoredMessage(BaseModel):
    id: int
    role: str
    content: str | list[dict[str, Any]]
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    status: str
    model: str | None = None
    completion_id: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    created_at: datetime
    error: ErrorDetail | None = None


class ConversationDetail(ConversationSummary):
    messages: list[StoredMessage]


class Deleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True


class Check(BaseModel):
    """One component of `/health`: `status` always; the rest only for a caller with a key."""

    status: Literal["ok", "down", "unreachable"]
    detail: str | None = None
    models: int | None = Field(default=None, description="models the upstreams offer")
    count: int | None = Field(default=None, description="live workers")
    ids: list[str] | None = Field(default=None, description="live workers' ids")


class HealthReport(BaseModel):
    """`GET /health`: `checks` has `database`, `redis`, `workers` and `upstream`."""

    status: Literal["ok", "unavailable"]
    auth: Literal["on", "off"] = Field(description="whether HAIA_API_KEYS is set")
    checks: dict[str, Check]


class Index(BaseModel):
    """`GET /`: what a person opening HAIA's address in a browser needs to find the rest."""

    name: Literal["HAIA"] = "HAIA"
    description: str = "Homelab AI Assistant: an OpenAI-compatible chat API"
    api: str = Field(default="/v1", description="the OpenAI-compatible API's base URL")
    models: str = "/v1/models"
    health: str = "/health"
    docs: str = Field(default="/docs", description="the OpenAPI document and its viewer")
