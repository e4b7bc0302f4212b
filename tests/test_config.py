"""Settings: defaults, parsing, and failing fast with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.config import Settings, load_settings
from app.upstreams import model_chain, split_model_id
from tests.procs import ROOT


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HAIA_MODEL", "HAIA_MODELS", "HAIA_REDIS_URL", "HAIA_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.model is None
    assert settings.ollama_base_url == "http://localhost:11434/v1"
    assert settings.database_url == "sqlite://data/haia.sqlite3"
    assert settings.effective_redis_url == "redis://127.0.0.1:6379/0"
    assert (settings.host, settings.port, settings.context_messages) == ("127.0.0.1", 8000, 20)


def test_models_and_keys_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAIA_MODEL", "ollama:llama3.2")
    monkeypatch.setenv("HAIA_MODELS", "anthropic:claude-sonnet-4-5, openai-chat:gpt-4o-mini,")
    monkeypatch.setenv("HAIA_API_KEYS", "k1,k2")
    settings = Settings()
    assert settings.configured_models == [
        "ollama:llama3.2",
        "anthropic:claude-sonnet-4-5",
        "openai-chat:gpt-4o-mini",
    ]
    assert [key.get_secret_value() for key in settings.api_keys] == ["k1", "k2"]
    assert "k1" not in repr(settings)


@pytest.mark.parametrize("value", ["llama3.2", "openai:gpt-4o", "ollama:", ":x", "bogus:name"])
def test_invalid_model_stops_with_one_line(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("HAIA_MODEL", value)
    with pytest.raises(SystemExit) as stopped:
        load_settings()
    message = str(stopped.value.code)
    assert "\n" not in message
    assert "HAIA_MODEL" in message
    assert "ollama:NAME" in message and "anthropic:NAME" in message


@pytest.mark.parametrize("module", ["app", "workers"])
def test_processes_refuse_to_start_with_a_bad_model(module: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "HAIA_MODEL": "gpt-4o", "HAIA_REDIS_URL": "redis://x:1/0"}
    result = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, timeout=30
    )
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("haia: invalid configuration: HAIA_MODEL")


def test_out_of_range_number_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAIA_CONTEXT_MESSAGES", "0")
    with pytest.raises(SystemExit) as stopped:
        load_settings()
    assert "HAIA_CONTEXT_MESSAGES" in str(stopped.value.code)


def test_only_documented_names_configure_haia(monkeypatch: pytest.MonkeyPatch) -> None:
    # honcho sets PORT; users' shells hold HOST, MODEL, DATABASE_URL, … for other programs.
    for name in ("HAIA_PORT", "HAIA_HOST", "HAIA_MODEL", "HAIA_DATABASE_URL", "HAIA_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    stray = {
        "PORT": "5000",
        "HOST": "0.0.0.0",
        "MODEL": "not-a-model",
        "MODELS": "x",
        "DATABASE_URL": "postgres://someone@elsewhere/db",
        "REDIS_URL": "redis://elsewhere:6379/0",
        "API_KEYS": "k",
        "LOG_LEVEL": "nonsense",
    }
    for name, value in stray.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert (settings.port, settings.host, settings.model, settings.models) == (
        8000,
        "127.0.0.1",
        None,
        [],
    )
    assert settings.database_url == "sqlite://data/haia.sqlite3"
    assert (settings.redis_url, settings.api_keys, settings.log_level) == (None, [], "INFO")


def test_operations_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HAIA_CORS_ORIGINS", "HAIA_ACCESS_LOG", "HAIA_WEB_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert (settings.cors_origins, settings.access_log, settings.web_workers) == ([], True, 1)
    monkeypatch.setenv("HAIA_CORS_ORIGINS", "https://Chat.example.org/, http://localhost:5173")
    monkeypatch.setenv("HAIA_ACCESS_LOG", "false")
    monkeypatch.setenv("HAIA_WEB_WORKERS", "4")
    settings = Settings()
    assert settings.cors_origins == ["https://chat.example.org", "http://localhost:5173"]
    assert (settings.access_log, settings.web_workers) == (False, 4)


@pytest.mark.parametrize("origin", ["chat.example.org", "https://x.org/path", "ftp://x.org"])
def test_a_bad_cors_origin_names_its_variable(monkeypatch: pytest.MonkeyPatch, origin: str) -> None:
    monkeypatch.setenv("HAIA_CORS_ORIGINS", origin)
    with pytest.raises(SystemExit) as stopped:
        load_settings()
    assert "HAIA_CORS_ORIGINS" in str(stopped.value.code)


def _clear_upstreams(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("HAIA_UPSTREAM_") or name in ("HAIA_ALIASES", "HAIA_MODEL"):
            monkeypatch.delenv(name)


def test_named_upstreams_beside_the_built_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_upstreams(monkeypatch)
    monkeypatch.setenv("HAIA_UPSTREAM_GPUBOX", "ollama:http://10.0.0.5:11434/v1")
    monkeypatch.setenv("HAIA_UPSTREAM_GPUBOX_MAX_CONCURRENT", "2")
    monkeypatch.setenv("HAIA_UPSTREAM_LM_STUDIO", "openai-chat:http://laptop:1234/v1")
    monkeypatch.setenv("HAIA_UPSTREAM_LM_STUDIO_API_KEY", "lm-key")
    monkeypatch.setenv("HAIA_UPSTREAM_CLOUD", "anthropic:https://api.anthropic.com")
    monkeypatch.setenv("HAIA_UPSTREAM_OLLAMA_MAX_CONCURRENT", "1")
    monkeypatch.setenv("HAIA_UPSTREAM_OPENAI_CHAT_MAX_CONCURRENT", "3")
    upstreams = Settings().upstreams
    assert list(upstreams) == ["ollama", "anthropic", "openai-chat", "cloud", "gpubox", "lm_studio"]
    gpubox = upstreams["gpubox"]
    assert (gpubox.kind, gpubox.base_url, gpubox.max_concurrent) == (
        "ollama",
        "http://10.0.0.5:11434/v1",
        2,
    )
    assert gpubox.limit_variable == "HAIA_UPSTREAM_GPUBOX_MAX_CONCURRENT"
    lm = upstreams["lm_studio"]
    assert (lm.kind, lm.api_key, lm.key_variable) == (
        "openai-chat",
        "lm-key",
        "HAIA_UPSTREAM_LM_STUDIO_API_KEY",
    )
    assert "lm-key" not in repr(lm) and "lm-key" not in repr(Settings())
    assert upstreams["cloud"].kind == "anthropic"
    assert upstreams["ollama"].max_concurrent == 1
    assert upstreams["openai-chat"].max_concurrent == 3
    assert upstreams["anthropic"].max_concurrent == 0


def test_aliases_and_models_of_named_upstreams(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_upstreams(monkeypatch)
    monkeypatch.setenv("HAIA_UPSTREAM_GPUBOX", "ollama:http://10.0.0.5:11434/v1")
    monkeypatch.setenv(
        "HAIA_ALIASES", "fast=gpubox:llama3.2, smart=anthropic:claude-sonnet-4-5|gpubox:qwen3:8b"
    )
    monkeypatch.setenv("HAIA_MODEL", "smart")
    monkeypatch.setenv("HAIA_MODELS", "gpubox:qwen3:8b")
    settings = Settings()
    assert settings.aliases == {
        "fast": ["gpubox:llama3.2"],
        "smart": ["anthropic:claude-sonnet-4-5", "gpubox:qwen3:8b"],
    }
    assert settings.configured_models == ["smart", "gpubox:qwen3:8b"]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"HAIA_UPSTREAM_GPUBOX": "ollama"}, "HAIA_UPSTREAM_GPUBOX"),
        ({"HAIA_UPSTREAM_GPUBOX": "vllm:http://x:8000/v1"}, "HAIA_UPSTREAM_GPUBOX"),
        ({"HAIA_UPSTREAM_GPUBOX": "ollama:10.0.0.5:11434"}, "HAIA_UPSTREAM_GPUBOX"),
        ({"HAIA_UPSTREAM_OLLAMA": "ollama:http://x:1/v1"}, "HAIA_UPSTREAM_OLLAMA"),
        ({"HAIA_UPSTREAM_BOX_MAX_CONCURRENT": "2"}, "HAIA_UPSTREAM_BOX"),
        (
            {"HAIA_UPSTREAM_BOX": "ollama:http://x:1/v1", "HAIA_UPSTREAM_BOX_MAX_CONCURRENT": "-1"},
            "HAIA_UPSTREAM_BOX_MAX_CONCURRENT",
        ),
        ({"HAIA_UPSTREAM_box-2": "ollama:http://x:1/v1"}, "HAIA_UPSTREAM_box-2"),
        ({"HAIA_ALIASES": "fast"}, "HAIA_ALIASES"),
        ({"HAIA_ALIASES": "fast=nowhere:llama3.2"}, "HAIA_ALIASES"),
        ({"HAIA_ALIASES": "a=ollama:x,a=ollama:y"}, "HAIA_ALIASES"),
        ({"HAIA_ALIASES": "ollama=ollama:x"}, "HAIA_ALIASES"),
        ({"HAIA_ALIASES": "a=ollama:x,b=a"}, "HAIA_ALIASES"),
        ({"HAIA_MODEL": "gpubox:llama3.2"}, "HAIA_MODEL"),
        ({"HAIA_MODELS": "ollama:x,qwen3:8b"}, "HAIA_MODELS"),
    ],
)
def test_a_bad_upstream_or_alias_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    _clear_upstreams(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        load_settings()
    message = str(stopped.value.code)
    assert message.startswith(f"haia: invalid configuration: {named}"), message
    assert "\n" not in message


def test_only_haia_upstream_names_make_upstreams(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_upstreams(monkeypatch)
    monkeypatch.setenv("UPSTREAM_GPUBOX", "ollama:http://x:1/v1")
    monkeypatch.setenv("GPUBOX", "ollama:http://x:1/v1")
    monkeypatch.setenv("HAIA_UPSTREAMS", "ollama:http://x:1/v1")
    assert list(Settings().upstreams) == ["ollama", "anthropic", "openai-chat"]


def test_the_text_before_the_first_colon_is_an_upstream_only_if_one_has_that_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clear_upstreams(monkeypatch)
    monkeypatch.setenv("HAIA_UPSTREAM_GPUBOX", "ollama:http://10.0.0.5:11434/v1")
    monkeypatch.setenv("HAIA_ALIASES", "smart=anthropic:claude-sonnet-4-5|gpubox:qwen3:8b")
    settings = Settings()
    upstreams = settings.upstreams
    split = split_model_id("gpubox:qwen3:8b", upstreams)
    assert split is not None and (split[0].name, split[1]) == ("gpubox", "qwen3:8b")
    assert split_model_id("qwen3:8b", upstreams) is None  # a bare Ollama name
    assert split_model_id("gpubox:", upstreams) is None
    assert split_model_id("smart", upstreams) is None
    assert model_chain("smart", settings.aliases) == [
        "anthropic:claude-sonnet-4-5",
        "gpubox:qwen3:8b",
    ]
    assert model_chain("gpubox:llama3.2", settings.aliases) == ["gpubox:llama3.2"]
