"""Request bodies: JSON decoded by msgspec into typed Structs, with errors that name the
problem and the field."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from aiohttp import web
from multidict import MultiDictProxy

from service.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

T = TypeVar("T")
MAX_BODY = 64 * 1024


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body must be at most {limit} bytes")
    try:
        body = await request.content.read(limit + 1)
    except ValueError as exc:  # a malformed chunked body
        raise InvalidRequest(f"unreadable body: {exc}") from None
    if len(body) > limit:
        raise PayloadTooLarge(f"the body must be at most {limit} bytes")
    return body


async def json_body(request: web.Request, type_: type[T]) -> T:
    if request.content_type != "application/json":
        raise UnsupportedMediaType("the body must be application/json")
    body = await read_body(request)
    try:
        return msgspec.json.decode(body, type=type_, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None


def _describe(exc: msgspec.ValidationError) -> str:
    # msgspec says e.g. "Expected `str`, got `int` - at `$.name`": name the field first.
    message = str(exc)
    if " - at `$." in message:
        text, _, path = message.partition(" - at `$.")
        return f"{path.rstrip('`')}: {text}"
    return message


async def form_body(
    request: web.Request, limit: int = MAX_BODY
) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
    """A form body (urlencoded or multipart); a malformed one is a 400, never a 500."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body must be at most {limit} bytes")
    try:
        return await request.post()
    except (ValueError, AssertionError, UnicodeDecodeError, LookupError) as exc:
        raise InvalidRequest(f"unreadable form body: {exc}") from None
