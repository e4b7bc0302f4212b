"""The embedded Redis that a machine without one gets: a real server, shared by processes."""

from __future__ import annotations

from pathlib import Path

import redis

from app.embedded_redis import redis_answers, start_embedded, stop_embedded
from tests.procs import free_port


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
