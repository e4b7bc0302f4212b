"""The worker honours HTTP(S)_PROXY and NO_PROXY for upstream requests, as the SDKs do,
looking them up once per URL (aiohttp's own `trust_env` re-read ~/.netrc on every request)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from workers.openai_wire import _proxy_for


@pytest.fixture(autouse=True)
def fresh_lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    _proxy_for.cache_clear()
    yield
    _proxy_for.cache_clear()


def test_no_proxy_variables_means_a_direct_connection() -> None:
    assert _proxy_for("http://10.0.0.5:11434/v1/chat/completions") is None


def test_the_scheme_picks_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://plain-proxy:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://tls-proxy:3128")
    assert _proxy_for("http://10.0.0.5:11434/v1/chat/completions") == "http://plain-proxy:3128"
    assert _proxy_for("https://api.openai.com/v1/chat/completions") == "http://tls-proxy:3128"


def test_no_proxy_bypasses_listed_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://plain-proxy:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1,.lan")
    assert _proxy_for("http://127.0.0.1:11434/v1/chat/completions") is None
    assert _proxy_for("http://gpubox.lan:11434/v1/chat/completions") is None
    assert _proxy_for("http://10.0.0.5:11434/v1/chat/completions") == "http://plain-proxy:3128"
