"""The README's first command, run the way a newcomer runs it, serves where the README says."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.procs import ROOT, wait_until

pytestmark = pytest.mark.e2e

# Variables a developer's shell may hold that a newcomer's does not.
_CONFIGURING = re.compile(r"^(HAIA_|OLLAMA_|ANTHROPIC_|OPENAI_|VIRTUAL_ENV$|UV_PROJECT)")


def readme_first_command() -> tuple[str, str]:
    """The first command of the README's first code block, and the address its comment names."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    first = block.splitlines()[0]
    command, _, comment = first.partition("#")
    address = re.search(r"https?://[\w.:-]+", comment)
    assert address, f"the README's first command names no address: {first!r}"
    return command.strip(), address.group(0)


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    """The working tree as a clone would have it: tracked and new files, nothing ignored."""
    clone = tmp_path / "haia"
    clone.mkdir()
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = clone / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return clone


@pytest.fixture
def first_command(
    fresh_clone: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    command, address = readme_first_command()
    port = int(address.rsplit(":", 1)[1])
    assert _port_is_free(port), f"port {port} is taken: stop what runs there to run this test"
    env = {name: value for name, value in os.environ.items() if not _CONFIGURING.match(name)}
    log = open(tmp_path / "first-command.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        ["bash", "-c", command],
        cwd=fresh_clone,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process, address
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        log.close()


@pytest.mark.timeout(120)
def test_the_first_command_serves_where_the_readme_says(
    first_command: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    process, address = first_command
    log = tmp_path / "first-command.log"

    def serving() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the first command exited:\n{log.read_text()}")
        return httpx.get(f"{address}/health", timeout=2).status_code == 200

    try:
        wait_until(serving, 60, f"{address}/health")
    except TimeoutError as exc:
        raise AssertionError(f"{address} never answered:\n{log.read_text()[-4000:]}") from exc

    health = httpx.get(f"{address}/health").json()
    assert health["checks"]["database"]["status"] == "ok"
    assert health["checks"]["redis"]["status"] == "ok"
    assert health["checks"]["workers"]["status"] == "ok"
    assert httpx.get(f"{address}/v1/models").status_code == 200
    # No model server on this machine: a clear answer, not a hang or a 500.
    response = httpx.post(
        f"{address}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello"}]},
        timeout=30,
    )
    assert response.status_code == 503, response.text
    assert "HAIA_MODEL" in response.json()["error"]["message"]
    # The SQLite file lives where the README says, inside the clone.
    assert (log.parent / "haia" / "data" / "haia.sqlite3").exists()
