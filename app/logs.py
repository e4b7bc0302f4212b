"""Logging: one line per event (JSON by default), carrying the request id of its work.

Configured secrets are scrubbed from every line, tracebacks included, whatever logged them;
uncaught exceptions and warnings go through the same handler.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType

from app.config import Settings
from app.redact import register, scrub, secrets_of

request_id_var: ContextVar[str] = ContextVar("haia_request_id", default="-")


class _Context(logging.Filter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self._process = process

    def filter(self, record: logging.LogRecord) -> bool:
        record.haia_process = self._process
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class _Scrubbing(logging.Formatter):
    """Formats with `inner`, then removes every configured secret from the whole line."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return scrub(self._inner.format(record))


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


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """An exception nothing caught: logged (so scrubbed), not printed raw to stderr."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("haia").critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def _per_job_lines(record: logging.LogRecord) -> bool:
    """False for arq's two INFO lines per job (`0.52s → id:generate(…)`, `… ← … ●`): HAIA logs
    each generation itself, and at hundreds of generations a second they cost the worker about
    as much as its SQL. Shown at HAIA_LOG_LEVEL=DEBUG; arq's retry and abort lines stay."""
    return not (
        record.levelno == logging.INFO and str(record.msg).startswith(("%6.2fs → ", "%6.2fs ← "))
    )


TEXT_FORMAT = "%(asctime)s %(levelname)s %(haia_process)s %(name)s [%(request_id)s] %(message)s"


def setup_logging(settings: Settings, *, process: str) -> None:
    """Send HAIA's, arq's and Sanic's logs to stderr at HAIA_LOG_LEVEL, as HAIA_LOG_FORMAT."""
    register(secrets_of(settings))
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context(process))
    formatter = JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(_Scrubbing(formatter))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name in ("sanic.root", "sanic.error", "sanic.server", "sanic.access", "arq"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_uncaught
    if root.level > logging.DEBUG:
        logging.getLogger("arq.worker").addFilter(_per_job_lines)
    for noisy in ("httpx", "httpx2", "httpcore", "tortoise", "aiosqlite", "asyncio", "asyncpg"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
