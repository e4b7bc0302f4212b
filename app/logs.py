"""Logging: one line per event, carrying the request id of the work it belongs to."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

from app.config import Settings

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


def setup_logging(settings: Settings, *, process: str) -> None:
    """Send HAIA's, arq's and Sanic's logs to stderr at HAIA_LOG_LEVEL."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context(process))
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(levelname)s %(haia_process)s %(name)s [%(request_id)s] %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name in ("sanic.root", "sanic.error", "sanic.server", "arq"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    for noisy in ("httpx", "httpx2", "httpcore", "tortoise", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
