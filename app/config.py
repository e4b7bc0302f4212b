"""HAIA's configuration: one typed settings object, read once from the environment."""

from __future__ import annotations

import os
import re
import sys
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from app.redact import redact_url
from app.upstreams import PREFIX, BuiltIns, Upstream, model_problem, parse_aliases, parse_upstreams

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "sqlite://data/haia.sqlite3"
UPSTREAM_VARIABLES = f"{PREFIX}*"
"""The (pseudo) alias under which every `HAIA_UPSTREAM_…` variable reaches the settings."""

PLACEHOLDER_KEYS = frozenset(
    {"change-me", "changeme", "replace-me", "your-key", "your-api-key", "secret"}
)
"""Keys copied from an example file: refused at start, they protect nothing."""

_ORIGIN_RE = re.compile(r"^https?://[^\s/]+/?$")


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class UpstreamVariables(PydanticBaseSettingsSource):
    """Every `HAIA_UPSTREAM_<NAME>…` variable: their names are the user's, not fields'."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found = {name: value for name, value in os.environ.items() if name.startswith(PREFIX)}
        return {UPSTREAM_VARIABLES: found} if found else {}


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
    upstream_variables: dict[str, str] = Field(
        default={}, validation_alias=_env(UPSTREAM_VARIABLES), repr=False
    )
    alias_list: Annotated[str, NoDecode] = Field(default="", validation_alias=_env("HAIA_ALIASES"))

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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            UpstreamVariables(settings_cls),
            dotenv_settings,
            file_secret_settings,
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
            return value.strip() or None
        return value

    @field_validator("alias_list")
    @classmethod
    def _aliases(cls, value: str) -> str:
        parse_aliases(value)  # fails fast, naming HAIA_ALIASES
        return value

    @model_validator(mode="after")
    def _models_exist(self) -> Settings:
        """Every configured model names an upstream that exists, or an alias."""
        upstreams, aliases = self.upstreams, self.aliases
        named = [("HAIA_MODEL", self.model), ("HAIA_TASK_MODEL", self.task_model)]
        named += [("HAIA_MODELS", model) for model in self.models]
        for alias, chain in aliases.items():
            if alias in upstreams:
                raise ValueError(f"HAIA_ALIASES: {alias!r} is the name of an upstream")
            named += [("HAIA_ALIASES", model) for model in chain]
        for variable, model_id in named:
            allowed = {} if variable == "HAIA_ALIASES" else aliases  # an alias names models
            problem = model_id and model_problem(model_id, upstreams, allowed)
            if problem:
                raise ValueError(f"{variable}: {problem}")
        return self

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
    def upstreams(self) -> dict[str, Upstream]:
        """Every upstream by name: `ollama`, `anthropic`, `openai-chat`, then HAIA_UPSTREAM_*."""
        built_ins = BuiltIns(
            ollama_base_url=self.ollama_base_url,
            anthropic_base_url=self.anthropic_base_url,
            anthropic_api_key=_secret(self.anthropic_api_key),
            openai_base_url=self.openai_base_url,
            openai_api_key=_secret(self.openai_api_key),
        )
        return parse_upstreams(self.upstream_variables, built_ins)

    @cached_property
    def aliases(self) -> dict[str, list[str]]:
        """HAIA_ALIASES: each alias's models, in the order they are tried."""
        return parse_aliases(self.alias_list)

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


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def load_settings() -> Settings:
    """Read the settings, or stop the process with one line naming the bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = str(error["loc"][0]) if error["loc"] else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        if where and where != UPSTREAM_VARIABLES and not message.startswith(f"{where}:"):
            message = f"{where}: {message}"
        sys.exit(f"haia: invalid configuration: {message}")
