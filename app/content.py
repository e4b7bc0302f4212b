"""Message content beyond plain text: image parts, tool calls and tool results, as stored.

Images sent as `data:` URLs are stored once each, by digest, in `haia_blob`; a message row keeps
its parts with a `haia-blob:<sha256>` reference in place of the data, so rows stay small and a
history resent every turn (as OpenWebUI does) stores each picture once. http(s) image URLs are
kept as they are and fetched by the provider.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

from app.db.models import Blob, Message
from app.errors import InvalidRequest
from app.schemas import ChatMessage

BLOB_SCHEME = "haia-blob:"
_DATA_URL = re.compile(r"^data:(?P<media>image/[\w.+-]+)(?:;[\w=.+-]+)*;base64,(?P<data>.*)$", re.S)


def decode_data_url(url: str, *, param: str) -> tuple[str, bytes]:
    """(media type, bytes) of a base64 `data:image/…` URL, or a 400 naming `param`."""
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidRequest(
            "An image data URL must be data:image/<type>;base64,<data>.", param=param
        )
    try:
        return match["media"], base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest("The image data URL is not valid base64.", param=param) from exc


def stored_parts(
    message: ChatMessage, index: int
) -> tuple[list[dict[str, Any]] | None, list[Blob]]:
    """The parts to store for an array content with images (None for text alone: it is
    stored as its joined text), and the new blobs."""
    if not message.images or not isinstance(message.content, list):
        return None, []
    parts: list[dict[str, Any]] = []
    blobs: list[Blob] = []
    for position, part in enumerate(message.content):
        if part.type == "text":
            parts.append({"type": "text", "text": part.text or ""})
            continue
        image = part.image_url
        assert image is not None  # validated by ChatCompletionRequest.unsupported_part
        url = image.url
        if url.startswith("data:"):
            media, data = decode_data_url(
                url, param=f"messages[{index}].content[{position}].image_url.url"
            )
            sha = hashlib.sha256(data).hexdigest()
            blobs.append(Blob(sha256=sha, media_type=media, data=data))
            url = f"{BLOB_SCHEME}{sha}"
        stored: dict[str, Any] = {"type": "image_url", "image_url": {"url": url}}
        if image.detail is not None:
            stored["image_url"]["detail"] = image.detail
        parts.append(stored)
    return parts, blobs


def identity(message: ChatMessage) -> str:
    """What a message's place in a conversation's digest covers: its text, and its images,
    tool calls or tool call id when it has them (plain text messages digest as before)."""
    return stored_identity(
        message.text,
        parts=[{"type": "image_url", "image_url": {"url": i.url}} for i in message.images],
        tool_calls=tool_calls_json(message),
        tool_call_id=message.tool_call_id,
    )


def stored_identity(
    text: str,
    *,
    parts: list[dict[str, Any]] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    tool_call_id: str | None = None,
) -> str:
    """`identity` of a stored message (its images by blob digest, as `identity` computes)."""
    extra: dict[str, Any] = {}
    images = [p["image_url"]["url"] for p in parts or () if p.get("type") == "image_url"]
    if images:
        extra["images"] = [_image_identity(url) for url in images]
    if tool_calls:
        extra["tool_calls"] = [
            [
                call["id"],
                call["function"]["name"],
                _arguments_identity(call["function"]["arguments"]),
            ]
            for call in tool_calls
        ]
    if tool_call_id:
        extra["tool_call_id"] = tool_call_id
    if not extra:
        return text
    return text + "\x1e" + json.dumps(extra, sort_keys=True, separators=(",", ":"))


def _arguments_identity(arguments: str) -> str:
    """Tool call arguments as JSON compares them: clients resend them re-serialized (OpenWebUI
    turns a model's `{"a": 1}` into `{"a":1}`), which must not make a history look edited."""
    try:
        return json.dumps(json.loads(arguments), sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):
        return arguments


def _image_identity(url: str) -> str:
    if url.startswith(BLOB_SCHEME):
        return url.removeprefix(BLOB_SCHEME)
    match = _DATA_URL.match(url)
    if match is not None:
        try:
            return hashlib.sha256(base64.b64decode(match["data"])).hexdigest()
        except (binascii.Error, ValueError):
            return url
    return url


def tool_calls_json(message: ChatMessage) -> list[dict[str, Any]] | None:
    if not message.tool_calls:
        return None
    return [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.function.name, "arguments": call.function.arguments},
        }
        for call in message.tool_calls
    ]


async def data_urls(messages: Sequence[Message]) -> dict[str, str]:
    """The `data:` URL of every blob these messages reference, by digest."""
    wanted = {
        str(part["image_url"]["url"]).removeprefix(BLOB_SCHEME)  # type: ignore[index]
        for message in messages
        for part in message.parts or ()
        if part.get("type") == "image_url" and str(part["image_url"]["url"]).startswith(BLOB_SCHEME)  # type: ignore[index]
    }
    if not wanted:
        return {}
    return {blob.sha256: data_url(blob) for blob in await Blob.filter(sha256__in=list(wanted))}


def data_url(blob: Blob) -> str:
    """A stored image as the `data:` URL it came in."""
    return f"data:{blob.media_type};base64,{base64.b64encode(blob.data).decode()}"


def with_data_urls(parts: list[dict[str, Any]], blobs: dict[str, str]) -> list[dict[str, Any]]:
    """Stored parts as the client sent them: blob references back to `data:` URLs."""
    shown = []
    for part in parts:
        if part.get("type") == "image_url":
            url = str(part["image_url"]["url"])
            if url.startswith(BLOB_SCHEME):
                url = blobs.get(url.removeprefix(BLOB_SCHEME), url)
            part = {**part, "image_url": {**part["image_url"], "url": url}}
        shown.append(part)
    return shown
