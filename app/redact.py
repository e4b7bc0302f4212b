"""Keeping secrets out of logs, tracebacks and error bodies.

The process registers its configured secrets once (`register`, from `app.logs.setup_logging`):
every API key, every password a database or Redis URL carries. `scrub` replaces them (and their
JSON- and URL-escaped spellings) in any text: log lines with their tracebacks, and every error
body HAIA renders (`HaiaError.body`), whatever an upstream put in its message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlsplit

from pydantic import BaseModel, SecretStr

REDACTED = "***"
_MIN_LENGTH = 4
"""Shorter "secrets" are not scrubbed: replacing every `ab` in every log line helps nobody."""

_secrets: list[str] = []
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


def url_password(url: str) -> str | None:
    """The password in `url`'s user info, if any (as written, percent-escapes and all)."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return None
    userinfo, at, _ = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return None
    return userinfo.partition(":")[2] or None


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***` (for messages naming a server)."""
    password = url_password(url)
    if not password:
        return url
    return url.replace(f":{password}@", f":{REDACTED}@", 1)


def secrets_of(settings: BaseModel) -> list[str]:
    """Every secret a settings object holds: its `SecretStr` values (alone or in lists), the
    values of its `…_API_KEY` variables (`HAIA_UPSTREAM_<NAME>_API_KEY`), and the passwords
    of the URLs among its strings."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, dict):
            named = [(str(key), item) for key, item in value.items()]
        elif isinstance(value, list | tuple):
            named = [(name, item) for item in value]
        else:
            named = [(name, value)]
        for key, item in named:
            if isinstance(item, SecretStr):
                found.append(item.get_secret_value())
            elif isinstance(item, str) and key.upper().endswith("API_KEY") and item:
                found.append(item)
            elif isinstance(item, str) and "://" in item:
                for url in _URL.findall(item):  # `kind:http://…` holds one inside
                    password = url_password(url)
                    if password:
                        found.append(password)
    return found


def register(secrets: Iterable[str]) -> None:
    """The secrets `scrub` removes in this process, with the ways they may be spelled."""
    spelled: set[str] = set()
    for secret in secrets:
        if len(secret) < _MIN_LENGTH:
            continue
        escaped = (json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1])
        for form in (secret, unquote(secret), quote(secret, safe=""), *escaped):
            if len(form) >= _MIN_LENGTH:
                spelled.add(form)
    # Longest first: a secret containing another is replaced whole.
    _secrets[:] = sorted(spelled, key=len, reverse=True)


def scrub(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
