"""Start-up checks that stop a process with one clear line, never a traceback or a password.

A wrong `HAIA_DATABASE_URL` or `HAIA_REDIS_URL` is the commonest start-up mistake; the line
names the server with its password replaced by `***` (and the log handler scrubs the rest).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import sys
import time
from collections.abc import Coroutine
from typing import Any

import redis

from app.config import Settings
from app.redact import redact_url

log = logging.getLogger("haia.startup")

REDIS_WAIT = 5.0
"""Seconds a starting process waits for Redis to answer (it may be starting too)."""


def stop(message: str) -> None:
    log.error("haia: %s", message)
    sys.exit(1)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def require_redis(url: str) -> None:
    """Return once Redis at `url` answers a PING, or stop the process saying why."""
    deadline = time.monotonic() + REDIS_WAIT
    while True:
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
            return
        except (redis.AuthenticationError, redis.ResponseError, ValueError) as exc:
            where = redact_url(url)
            stop(f"Redis at {where} refused HAIA ({_reason(exc)}); check HAIA_REDIS_URL")
        except (redis.RedisError, OSError) as exc:
            if time.monotonic() >= deadline:
                where = redact_url(url)
                stop(f"cannot reach Redis at {where} ({_reason(exc)}); check HAIA_REDIS_URL")
            time.sleep(0.5)


def require(work: Coroutine[Any, Any, None], what: str, url: str, variable: str) -> None:
    """Run `work` (a start-up step using `url`), or stop the process saying why."""
    try:
        asyncio.run(work)
    except Exception as exc:  # noqa: BLE001 - any failure here means HAIA cannot start
        stop(f"cannot open {what} at {redact_url(url)} ({_reason(exc)}); check {variable}")


def is_loopback(host: str) -> bool:
    """True when `host` (HAIA_HOST) only accepts connections from this machine."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def warn_if_exposed(settings: Settings) -> None:
    """Say loudly that anyone who reaches HAIA may use it when it listens beyond loopback
    without keys."""
    if settings.api_keys or is_loopback(settings.host):
        return
    banner = "!" * 78
    log.warning(
        "%s\nHAIA listens on %s:%d with NO API KEYS: anyone who can reach this address can use "
        "your models, read every stored conversation and delete them. Set HAIA_API_KEYS "
        '(generate one: python -c "import secrets; print(secrets.token_urlsafe(32))"), or '
        "set HAIA_HOST=127.0.0.1 behind a reverse proxy that authenticates.\n%s",
        banner,
        settings.host,
        settings.port,
        banner,
    )
