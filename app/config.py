"""HAIA's configuration: one typed settings object, read once from the environment."""

from __future__ import annotations

import re
import sys
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.redact import redact_url

PROVIDERS = ("ollama", "anthropic", "openai-chat")
MODEL_FORMS = "ollama:NAME, anthropic:NAME or openai-chat:NAME (e.g. ollama:llama3.2)"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "sqlite://data/haia.sqlite3"

PLACEHOLDER_KEYS = frozenset(
    {"change-me", "changeme", "replace-me", "your-key", "your-api-key", "secret"}
)
"""Keys copied from an example file: refused at start, they protect nothing."""

_ORIGIN_RE = re.compile(r"^https?://[^\s/]+/?$")
_MODEL_RE = re.compile(r"^(?P<provider>[a-z-]+):(?P<name>\S+)$")


def check_model_id(value: str) -> str:
    """Return `value` if it is a `provider:name` HAIA understands, else raise ValueError."""
    match = _MODEL_RE.match(value.strip())
    if match is None or match["provider"] not in PROVIDERS:
        raise ValueError(f"{value!r} is not a model HAIA can use; accepted forms: {MODEL_FORMS}")
    return value.strip()


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    """Everything web and worker read from the environment; nothing else reads `os.environ`."""

    # Only the documented names configure HAIA: each field is read from its alias alone
    # (no `populate_by_name`), so a stray `PORT` (honcho sets one), `MODEL` or `DATABASE_URL`
    # in the environment changes nothing.
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=False, frozen=True)

    model: str | None = Field(default=None, validation_alias=_env("HAIA_MODEL"))
    models: Annotated[list[str], NoDecode] = Field(default=[], validation_alias=_env("HAIA_MODELS"))
    task_model: str | None = Field(default=None, validation_alias=_env("HAIA_TASK_MODEL"))
    ollama_base_url: str = Field(
        default="http://localhost:11434/v1", validation_alias=_env("OLLAMA_BASE_URL")
    )
    anthropic_api_key: SecretStr | None = Field(
        default=None, validation_alias=_env("ANTHROPIC_API_KEY")
    )
    anthropic_base_url: str | None = Field(
        default=None, validation_alias=_env("ANTHROPIC_BASE_URL")
    )
    openai_api_key: SecretStr | None = Field(default=None, validation_alias=_env("OPENAI_API_KEY"))
    openai_base_url: str | None = Field(default=None, validation_alias=_env("OPENAI_BASE_URL"))

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL, validation_alias=_env("HAIA_DATABASE_URL")
    )
    redis_url: str | None = Field(default=None, validation_alias=_env("HAIA_REDIS_URL"))
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default=[], validation_alias=_env("HAIA_API_KEYS")
    )
    host: str = Field(default="127.0.0.1", validation_alias=_env("HAIA_HOST"))
    port: int = Field(default=8000, ge=1, le=65535, validation_alias=_env("HAIA_PORT"))
    context_messages: int = Field(
        default=20, ge=1, le=10_000, validation_alias=_env("HAIA_CONTEXT_MESSAGES")
    )

    worker_max_jobs: int = Field(
        default=500, ge=1, le=100_000, validation_alias=_env("HAIA_WORKER_MAX_JOBS")
    )
    worker_poll_delay: float = Field(
        default=0.5, gt=0, le=60, validation_alias=_env("HAIA_WORKER_POLL_DELAY")
    )
    llm_timeout: float = Field(default=300.0, gt=0, validation_alias=_env("HAIA_LLM_TIMEOUT"))
    llm_retries: int = Field(default=2, ge=0, le=10, validation_alias=_env("HAIA_LLM_RETRIES"))
    llm_retry_max_wait: float = Field(
        default=20.0, ge=0, le=600, validation_alias=_env("HAIA_LLM_RETRY_MAX_WAIT")
    )
    queue_timeout: float = Field(default=30.0, gt=0, validation_alias=_env("HAIA_QUEUE_TIMEOUT"))
    request_timeout: float = Field(
        default=60.0, gt=0, le=3600, validation_alias=_env("HAIA_REQUEST_TIMEOUT")
    )
    log_format: Literal["json", "text"] = Field(
        default="json", validation_alias=_env("HAIA_LOG_FORMAT")
    )
    job_timeout: int = Field(default=3600, ge=10, validation_alias=_env("HAIA_JOB_TIMEOUT"))
    replay_ttl: int = Field(default=3600, ge=1, validation_alias=_env("HAIA_REPLAY_TTL"))
    keepalive_interval: float = Field(
        default=15.0, gt=0, le=300, validation_alias=_env("HAIA_KEEPALIVE_INTERVAL")
    )
    worker_dead_after: float = Field(
        default=10.0, ge=2, le=300, validation_alias=_env("HAIA_WORKER_DEAD_AFTER")
    )
    shutdown_grace: int = Field(
        default=20, ge=0, le=3600, validation_alias=_env("HAIA_SHUTDOWN_GRACE")
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, validation_alias=_env("HAIA_MAX_BODY_BYTES")
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", validation_alias=_env("HAIA_LOG_LEVEL")
    )
    access_log: bool = Field(default=True, validation_alias=_env("HAIA_ACCESS_LOG"))
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default=[], validation_alias=_env("HAIA_CORS_ORIGINS")
    )
    web_workers: int = Field(default=1, ge=1, le=64, validation_alias=_env("HAIA_WEB_WORKERS"))
    max_concurrent_per_owner: int = Field(
        default=16, ge=0, le=100_000, validation_alias=_env("HAIA_MAX_CONCURRENT_PER_OWNER")
    )
    max_streams_per_owner: int = Field(
        default=64, ge=0, le=100_000, validation_alias=_env("HAIA_MAX_STREAMS_PER_OWNER")
    )
    max_messages: int = Field(
        default=1000, ge=1, le=1_000_000, validation_alias=_env("HAIA_MAX_MESSAGES")
    )

    @field_validator("models", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("api_keys")
    @classmethod
    def _real_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for key in value:
            if key.get_secret_value().lower().replace("_", "-") in PLACEHOLDER_KEYS:
                raise ValueError(
                    "a key is a placeholder from an example; generate a real one: "
                    'python -c "import secrets; print(secrets.token_urlsafe(32))"'
                )
        return value

    @field_validator("model", "task_model", mode="before")
    @classmethod
    def _model(cls, value: object) -> object:
        if isinstance(value, str):
            return check_model_id(value) if value.strip() else None
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        return [check_model_id(item) for item in value]

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        origins = []
        for origin in value:
            if origin != "*" and not _ORIGIN_RE.match(origin):
                raise ValueError(
                    f"{origin!r} is not an origin (scheme://host[:port], no path) nor *"
                )
            origins.append(origin.rstrip("/").lower())
        return origins

    @field_validator("ollama_base_url", "anthropic_base_url", "openai_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"{redact_url(value)!r} is not an http(s) URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value and not re.match(r"^(rediss?|unix)://", value):
            raise ValueError(f"{redact_url(value)!r} is not a Redis URL (redis://host:port/db)")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not re.match(r"^(sqlite|postgres|postgresql|asyncpg)://", value):
            raise ValueError(
                f"{redact_url(value)!r} is not a database URL (sqlite://… or postgres://…)"
            )
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _case(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()

    @cached_property
    def configured_models(self) -> list[str]:
        """The models named by HAIA_MODEL and HAIA_MODELS, in order, without repeats."""
        ordered = [self.model, *self.models] if self.model else list(self.models)
        return list(dict.fromkeys(ordered))

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def data_dir(self) -> Path:
        return Path("data")


def load_settings() -> Settings:
    """Read the settings, or stop the process with one line naming the bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = str(error["loc"][0]) if error["loc"] else "?"
        message = str(error["msg"]).removeprefix("Value error, ")
        sys.exit(f"haia: invalid configuration: {where}: {message}")
