"""Reading a JSON request body into a wire schema, with OpenAI-style 400s."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sanic import Request

from app.errors import BodyTimeout, BodyTooLarge, InvalidRequest

SchemaT = TypeVar("SchemaT", bound=BaseModel)


class _NonFinite(ValueError):
    pass


def _no_constant(name: str) -> float:
    """`NaN`, `Infinity`, `-Infinity`: Python's json accepts them, JSON does not."""
    raise _NonFinite(name)


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""NUL (no PostgreSQL text holds it) and lone surrogates (not encodable as UTF-8)."""
_ESCAPED_UNSTORABLE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def _unstorable_at(value: Any, at: tuple[int | str, ...] = ()) -> tuple[int | str, ...] | None:
    """Where the first string (or key) holding a character HAIA cannot store is, if any."""
    if isinstance(value, str):
        return at if _UNSTORABLE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _UNSTORABLE.search(key):
                return (*at, "<key>")
            found = _unstorable_at(item, (*at, key))
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _unstorable_at(item, (*at, index))
            if found is not None:
                return found
    return None


def _param(loc: tuple[int | str, ...]) -> str | None:
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


async def read_body(request: Request, *, within: float, max_bytes: int) -> None:
    """Receive the body of a `stream=True` route, bounding its size and how long it may take."""
    declared = request.headers.get("content-length", "0")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(
            f"The request body is {int(declared)} bytes; HAIA accepts at most {max_bytes} "
            "(HAIA_MAX_BODY_BYTES)."
        )
    try:
        async with asyncio.timeout(within):
            await request.receive_body()  # type: ignore[no-untyped-call]
    except TimeoutError:
        raise BodyTimeout(
            f"The request body did not arrive within {within:g} s (HAIA_REQUEST_TIMEOUT)."
        ) from None


def release_body(request: Request) -> None:
    """Let go of the raw body once the turn is stored: a stream may last minutes, and a client
    such as OpenWebUI resends the whole conversation with every turn (what is stored is read
    back by the worker, not from here)."""
    request.body = b""


def parse_body(request: Request, schema: type[SchemaT]) -> SchemaT:
    """Validate the body against `schema`, or raise `InvalidRequest` naming the field."""
    content_type = request.headers.get("content-type", "application/json")
    if "json" not in content_type.split(";", 1)[0]:
        raise InvalidRequest(
            f"The body must be JSON (Content-Type: application/json), not {content_type!r}."
        )
    raw = request.body or b""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, _NonFinite) as exc:
        raise InvalidRequest(
            "We could not parse the JSON body of your request: it is not valid JSON."
        ) from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The JSON body must be an object.")
    # A raw NUL or surrogate is not valid JSON; escaped ones are, and are found first by a
    # cheap scan of the bytes, then placed by a walk of the parsed body.
    if _ESCAPED_UNSTORABLE.search(raw):
        found = _unstorable_at(data)
        if found is not None:
            param = _param(found)
            raise InvalidRequest(
                f"Invalid request: {param or 'the body'} contains a NUL character or a lone "
                "surrogate (\\u0000, \\ud800-\\udfff), which HAIA cannot store.",
                param=param,
            )
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = _param(tuple(error["loc"]))
        message = str(error["msg"]).removeprefix("Value error, ")
        where = f"{param}: " if param else ""
        raise InvalidRequest(f"Invalid request: {where}{message}", param=param) from None
