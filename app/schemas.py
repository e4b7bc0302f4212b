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


class ContentPart(BaseModel):
    """One element of an array `content` (`text`, `image_url`, …); unknown kinds are kept."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        """The message's text: a string content, or its text parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if part.text is not None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`. Fields HAIA does not act on (tools, …) are accepted."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    # Strict: `true` is not a number nor `1` a boolean, as in OpenAI's own validation.
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, ge=0, le=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    user: str | None = None
    n: StrictInt | None = Field(default=None, ge=1)

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
    def _ends_with_user_turn(self) -> ChatCompletionRequest:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> dict[str, Any]:
        """The sampling settings the model receives (pydantic-ai `ModelSettings` keys)."""
        settings: dict[str, Any] = {}
        if self.temperature is not None:
            settings["temperature"] = self.temperature
        if self.top_p is not None:
            settings["top_p"] = self.top_p
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None:
            settings["max_tokens"] = max_tokens
        if self.stop is not None:
            settings["stop_sequences"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.seed is not None:
            settings["seed"] = self.seed
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


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


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
    content: str
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
