"""The OpenAPI description: pydantic's JSON Schemas of the wire models, as sanic-ext components.

sanic-ext writes OpenAPI 3.0.3, so the schemas are brought to that dialect (`nullable` instead
of a `null` type, `enum` instead of `const`). Routes then name models, and sanic-ext refers to
these components.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from sanic_ext import openapi
from sanic_ext.extensions.openapi.builders import OperationStore, SpecificationBuilder
from sanic_ext.extensions.openapi.definitions import Component, Reference
from sanic_ext.extensions.openapi.types import Integer, String

from app.schemas import ChatCompletionChunk, ErrorResponse

REF = "#/components/schemas/{model}"
T = TypeVar("T")


def to_openapi_30(node: Any) -> Any:
    """A JSON Schema (2020-12, as pydantic writes it) in the OpenAPI 3.0 dialect."""
    if isinstance(node, list):
        return [to_openapi_30(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and _NULL in options:
            rest = [option for option in options if option != _NULL]
            del node[key]
            node["nullable"] = True
            if len(rest) == 1 and "$ref" in rest[0]:
                node["allOf"] = rest  # a $ref takes no siblings in 3.0
            elif len(rest) == 1:
                node.update(rest[0])
            else:
                node[key] = rest
    if node.get("type") == "null":
        del node["type"]
        node["nullable"] = True
    return {key: to_openapi_30(value) for key, value in node.items()}


_NULL = {"type": "null"}


def register(*models: type[BaseModel], mode: str = "serialization") -> None:
    """Add `models` (and the models they use) to the document's components."""
    spec = SpecificationBuilder()
    for model in models:
        schema = model.model_json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
        for name, definition in schema.pop("$defs", {}).items():
            spec.add_component("schemas", name, to_openapi_30(definition))
        spec.add_component("schemas", model.__name__, to_openapi_30(schema))


_ERROR_TEXT = {
    400: "Invalid request",
    401: "Missing or wrong API key, or the upstream rejected HAIA's credentials",
    404: "Not found (or another owner's)",
    408: "The request body came too slowly",
    413: "The request body is too large",
    429: "Too many generations or streams at once for this owner "
    "(HAIA_MAX_CONCURRENT_PER_OWNER, HAIA_MAX_STREAMS_PER_OWNER), or the upstream is rate "
    "limiting; wait Retry-After seconds",
    500: "Unexpected error (details in the log, under the request id)",
    502: "The upstream failed",
    503: "A dependency (upstream, database, Redis, worker) is unavailable",
    504: "The upstream did not answer in time",
}


def returns(
    status: int, model: type[BaseModel], description: str, *, media: str = "application/json"
) -> Callable[[T], T]:
    """Document a successful response with `model` (registered as a component)."""
    register(model)
    return openapi.response(status, {media: Component(model)}, description)


def errors(*statuses: int) -> Callable[[T], T]:
    """Document the OpenAI-shaped error responses a route can give."""
    register(ErrorResponse)

    def decorate(handler: T) -> T:
        for status in (*statuses, 401, 500):
            handler = openapi.response(
                status, {"application/json": Component(ErrorResponse)}, _ERROR_TEXT[status]
            )(handler)
        return handler

    return decorate


def integer(**bounds: int) -> Any:
    """An integer parameter schema with bounds (`minimum=`, `maximum=`)."""
    return Integer(**bounds)  # type: ignore[no-untyped-call]


def text(max_length: int) -> Any:
    """A string parameter schema of at most `max_length` characters."""
    return String(maxLength=max_length)  # type: ignore[no-untyped-call]


def stream_events() -> Any:
    """One server-sent event: `data` is a ChatCompletionChunk or an ErrorResponse as JSON, or
    the final `[DONE]`; `id` is the event's sequence number (resume with Last-Event-ID)."""
    register(ChatCompletionChunk, ErrorResponse)
    spec = SpecificationBuilder()
    spec.add_component(
        "schemas",
        "StreamEvent",
        {
            "type": "object",
            "description": stream_events.__doc__,
            "properties": {
                "data": {"type": "string"},
                "id": {"type": "string"},
                "event": {"type": "string"},
            },
        },
    )
    return Reference(REF.format(model="StreamEvent"))  # type: ignore[no-untyped-call]


def response_events() -> Any:
    """One Responses API server-sent event: `event` is its type, `data` the event as JSON with
    its `sequence_number` (resume with `starting_after`), or the final `[DONE]`; no `id`."""
    spec = SpecificationBuilder()
    spec.add_component(
        "schemas",
        "ResponseStreamEvent",
        {
            "type": "object",
            "description": response_events.__doc__,
            "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
        },
    )
    return Reference(REF.format(model="ResponseStreamEvent"))  # type: ignore[no-untyped-call]


BEARER = "bearer"


def secure_operations(app: Any, *, public: Callable[[str], bool]) -> None:
    """Declare the bearer scheme, and require it on every operation but the public ones, so
    Swagger UI's "Authorize" sends the key with "Try it out"."""
    app.ext.openapi.add_security_scheme(
        BEARER,
        "http",
        scheme="bearer",
        description="One of HAIA_API_KEYS, sent as `Authorization: Bearer <key>`.",
    )
    for route in app.router.routes:
        path = "/" + route.path.lstrip("/")
        if public(path) or route.name.startswith(f"{app.name}.openapi."):
            continue
        operation = OperationStore()[route.handler]  # type: ignore[no-untyped-call]
        if {BEARER: []} not in operation.security:
            operation.secured(BEARER)
