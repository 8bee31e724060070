"""Request bodies: JSON decoded by msgspec into typed Structs, with errors that name the
problem and the field."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import MultiDictProxy

from service.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

T = TypeVar("T")
MAX_BODY = 64 * 1024

# What aiohttp raises for bytes it cannot turn into a body: a malformed chunked body
# (ValueError), a Content-Encoding that does not decompress (RequestPayloadError, or the
# parser's own HttpProcessingError). The client's fault, so a 400, never a 500.
_UNREADABLE = (ValueError, RequestPayloadError, HttpProcessingError)
# Decoding a form adds its own: bad multipart framing (AssertionError), a charset that is
# unknown (LookupError) or wrong (UnicodeDecodeError, a ValueError), a part in a
# Content-Transfer-Encoding aiohttp does not know (RuntimeError).
_UNREADABLE_FORM = (*_UNREADABLE, AssertionError, LookupError, RuntimeError)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the body must be at most {limit} bytes")


def _reason(exc: BaseException) -> str:
    # aiohttp wraps the parser's error, whose str() is "400, message:\n  Can not decode
    # content-encoding: gzip"; the client needs only the message.
    if isinstance(exc, RequestPayloadError):
        exc = exc.__cause__ or exc
    return exc.message if isinstance(exc, HttpProcessingError) else str(exc)


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        body = await request.content.read(limit + 1)
    except _UNREADABLE as exc:
        raise InvalidRequest(f"unreadable body: {_reason(exc)}") from None
    if len(body) > limit:
        raise _too_large(limit)
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
        raise _too_large(limit)
    try:
        form = await request.post()
    except _UNREADABLE_FORM as exc:
        raise InvalidRequest(f"unreadable form body: {_reason(exc)}") from None
    # A chunked body has no Content-Length to refuse up front; aiohttp has read it within
    # its own (larger) client_max_size, so hold it to ours now.
    if request.content.total_bytes > limit:
        raise _too_large(limit)
    return form
