"""How arq jobs cross Redis: JSON, never pickle.

arq pickles job arguments by default, so anyone who can write to Redis (often reachable by the
whole LAN, often without a password) could run code in the worker. HAIA's job arguments are
plain data, so they travel as JSON; a job that does not decode is refused by arq (logged,
failed, not run) and the sweep ends its generation.
"""

from __future__ import annotations

import json
from typing import Any


def _plain(value: Any) -> Any:
    if isinstance(value, BaseException):  # arq stores a failed job's exception as its result
        return f"{type(value).__name__}: {value}"
    raise TypeError(f"{type(value).__name__} cannot cross Redis as JSON")


def serialize(data: dict[str, Any]) -> bytes:
    return json.dumps(data, default=_plain, separators=(",", ":")).encode()


def deserialize(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("a job is a JSON object")
    return data
