"""`python -m app`: apply migrations once, then serve the web process (or HAIA_WEB_WORKERS)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any

from sanic import Sanic

from app.config import Settings, load_settings
from app.db import apply_migrations
from app.embedded_redis import ensure_redis
from app.logs import setup_logging
from app.preflight import require, require_redis, warn_if_exposed
from app.server import create_app

BACKLOG = 4096
"""Connections the kernel queues before the web accepts them (capped by `net.core.somaxconn`).
Sanic's default of 100 overflowed when a few hundred clients connected at once: the kernel
dropped their SYNs, and each dropped client waited a full second for its retransmission."""


def main() -> None:
    settings = load_settings()
    setup_logging(settings, process="web")
    # Both happen once, in this process, before any worker starts: the embedded Redis (when
    # needed) lives as long as this process, and no two workers race to migrate.
    redis_url = ensure_redis(settings)
    require_redis(redis_url)
    require(
        apply_migrations(settings.database_url),
        "the database",
        settings.database_url,
        "HAIA_DATABASE_URL",
    )
    warn_if_exposed(settings)
    app = create_app(settings, redis_url=redis_url)
    if settings.web_workers == 1:
        app.run(
            host=settings.host,
            port=settings.port,
            backlog=BACKLOG,
            single_process=True,
            access_log=False,
            motd=False,
        )
        return
    serve_forked(app, settings)


def serve_forked(app: Sanic[Any, Any], settings: Settings) -> None:
    """`HAIA_WEB_WORKERS` processes on one listening socket, under a supervisor of our own.

    Sanic's multi-worker manager sometimes crashed on SIGTERM (Sanic 25) and left a forked
    worker serving on its own. Here the socket is bound once, each child runs the app as a
    single process on it (forked: everything is already imported; nothing is open yet, the
    migration's connections are closed), and this process forwards SIGTERM/SIGINT to them and
    waits for all of them before it exits (stopping the embedded Redis, when it started one).
    """
    sock = socket.create_server((settings.host, settings.port), backlog=BACKLOG)
    sock.set_inheritable(True)
    children: list[int] = []
    for _ in range(settings.web_workers):
        pid = os.fork()
        if pid == 0:
            _serve_child(app, sock)
        children.append(pid)
    sock.close()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:  # waitpid retries by itself when a signal interrupts it
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(child, 0)[1]:
                status = 1
                forward(signal.SIGTERM, None)  # one died: stop the others, then exit
    sys.exit(status)


def _serve_child(app: Sanic[Any, Any], sock: socket.socket) -> None:
    """Serve until told to stop; exit without the parent's atexit hooks (the embedded Redis
    belongs to the supervisor)."""
    code = 0
    try:
        app.run(sock=sock, single_process=True, access_log=False, motd=False)
    except BaseException:
        logging.getLogger(__name__).exception("web worker failed")
        code = 1
    finally:
        os._exit(code)
