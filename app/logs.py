"""Logging: one line per event (JSON by default), carrying the request id of its work.

Configured secrets are scrubbed from every line, whatever logged them.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

from app.config import Settings

request_id_var: ContextVar[str] = ContextVar("haia_request_id", default="-")
REDACTED = "***"


class _Context(logging.Filter):
    def __init__(self, process: str, secrets: list[str]) -> None:
        super().__init__()
        self._process = process
        self._secrets = [secret for secret in secrets if secret]

    def filter(self, record: logging.LogRecord) -> bool:
        record.haia_process = self._process
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        if self._secrets:
            message = record.getMessage()
            for secret in self._secrets:
                message = message.replace(secret, REDACTED)
            record.msg, record.args = message, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": getattr(record, "haia_process", "-"),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        line.update(getattr(record, "haia_fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(haia_process)s %(name)s [%(request_id)s] %(message)s"


def setup_logging(settings: Settings, *, process: str) -> None:
    """Send HAIA's, arq's and Sanic's logs to stderr at HAIA_LOG_LEVEL, as HAIA_LOG_FORMAT."""
    secrets = [key.get_secret_value() for key in settings.api_keys]
    for secret in (settings.anthropic_api_key, settings.openai_api_key):
        if secret is not None:
            secrets.append(secret.get_secret_value())
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context(process, secrets))
    formatter = JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name in ("sanic.root", "sanic.error", "sanic.server", "sanic.access", "arq"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    for noisy in ("httpx", "httpx2", "httpcore", "tortoise", "aiosqlite", "asyncio", "asyncpg"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
