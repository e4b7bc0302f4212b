"""Reading a JSON request body into a wire schema, with OpenAI-style 400s."""

from __future__ import annotations

import asyncio
import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from sanic import Request

from app.errors import BodyTimeout, BodyTooLarge, InvalidRequest

SchemaT = TypeVar("SchemaT", bound=BaseModel)


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


def parse_body(request: Request, schema: type[SchemaT]) -> SchemaT:
    """Validate the body against `schema`, or raise `InvalidRequest` naming the field."""
    content_type = request.headers.get("content-type", "application/json")
    if "json" not in content_type.split(";", 1)[0]:
        raise InvalidRequest(
            f"The body must be JSON (Content-Type: application/json), not {content_type!r}."
        )
    try:
        data = json.loads(request.body or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(
            "We could not parse the JSON body of your request: it is not valid JSON."
        ) from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The JSON body must be an object.")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = _param(tuple(error["loc"]))
        message = str(error["msg"]).removeprefix("Value error, ")
        where = f"{param}: " if param else ""
        raise InvalidRequest(f"Invalid request: {where}{message}", param=param) from None
