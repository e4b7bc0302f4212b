"""Real processes for end-to-end tests: the fake upstream, and HAIA's web and worker."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def procfile_commands() -> dict[str, str]:
    """The Procfile's `name: command` lines."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {name.strip(): cmd.strip() for name, _, cmd in (line.partition(":") for line in lines)}


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        # Whatever it forked (Sanic's web workers) goes with it: an orphan left running would
        # keep serving, reaping and sweeping on a later test's Redis.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode


def spawn(name: str, command: list[str], env: dict[str, str], log_dir: Path) -> Proc:
    log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
    bin_dir = str(Path(sys.executable).parent)
    full_env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends its children too
        )
    return Proc(name, process, log_path)


def spawn_procfile(name: str, env: dict[str, str], log_dir: Path) -> Proc:
    """Start the Procfile's `name` process exactly as honcho would (through a shell)."""
    command = procfile_commands()[name]
    return spawn(name, ["bash", "-c", f"exec {command}"], env, log_dir)


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, procs: Sequence[Proc] = ()
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.process.poll() is not None:
                raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.log()}")
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.05)
    logs = "\n".join(f"--- {p.name}\n{p.log()[-4000:]}" for p in procs)
    raise TimeoutError(f"timed out waiting for {what}\n{logs}")


@dataclass
class Stack:
    """A running HAIA (web + worker) with its fake upstream."""

    base_url: str
    env: dict[str, str]
    log_dir: Path
    database_url: str
    upstream_url: str
    web: Proc | None = None
    worker: Proc | None = None
    extra: list[Proc] = field(default_factory=list)

    def start_web(self, wait: bool = True) -> Proc:
        self.web = spawn_procfile("web", self.env, self.log_dir)
        if wait:
            wait_until(self.web_ready, 30, "web", [self.web])
        return self.web

    def start_worker(self, wait: bool = True) -> Proc:
        self.worker = spawn_procfile("worker", self.env, self.log_dir)
        if wait:
            wait_until(self.healthy, 30, "worker", [self.worker])
        return self.worker

    def web_ready(self) -> bool:
        return httpx.get(f"{self.base_url}/health", timeout=2).status_code in (200, 503)

    def healthy(self) -> bool:
        return httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200

    def start_extra_worker(self) -> Proc:
        proc = spawn_procfile("worker", self.env, self.log_dir)
        self.extra.append(proc)
        return proc

    def stop(self) -> None:
        for proc in (self.web, self.worker, *self.extra):
            if proc is not None:
                proc.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {proc.name}\n{proc.log()}" for proc in (self.web, self.worker) if proc is not None
        )

    async def upstream_requests(self) -> list[dict[str, Any]]:
        """Every chat request the fake upstream received, as it received it."""
        async with httpx.AsyncClient(timeout=5) as http:
            return list((await http.get(f"{self.upstream_url}/_requests")).json())

    async def forget_upstream_requests(self) -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            await http.delete(f"{self.upstream_url}/_requests")
