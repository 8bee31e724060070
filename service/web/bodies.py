"""Request bodies: JSON decoded by msgspec into typed Structs, with errors that name the
problem and the field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, TypeVar

import msgspec
from aiohttp import compression_utils, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import MultiDict, MultiDictProxy
from yarl import query_to_pairs

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


#: the content codings a body may come in: none, or one aiohttp decodes as it reads
CODINGS = frozenset(
    {"identity", "gzip", "deflate"}
    | ({"br"} if compression_utils.HAS_BROTLI else set())
    | ({"zstd"} if compression_utils.HAS_ZSTD else set())
)


def content_coding(request: web.Request) -> str | None:
    """The body's one content coding, in lower case when ASCII (None: none given). Two
    lines are refused: aiohttp's parsers each read another of them."""
    given = request.headers.getall("Content-Encoding", ())
    if len(given) > 1:
        raise InvalidRequest("Content-Encoding is given more than once")
    if not given:
        return None
    return given[0].strip().lower() if given[0].isascii() else given[0]


def _known_coding(request: web.Request) -> None:
    """415 for a body in a content coding this server does not decode (RFC 9110 §15.5.16,
    with Accept-Encoding naming those it does, §12.5.3): it was read as it came, as if it
    were none, and a coded form may still parse as another one."""
    coding = content_coding(request)
    if coding is not None and coding not in CODINGS:
        accepted = ", ".join(sorted(CODINGS - {"identity"}))
        raise UnsupportedMediaType(
            f"Content-Encoding must be one of {accepted}, or none",
            headers={"Accept-Encoding": accepted},
        )


async def read_body(
    request: web.Request, limit: int = MAX_BODY, *, any_coding: bool = False
) -> bytes:
    """The whole body, however many pieces it arrives in: one read returns only what has
    arrived so far, and a body split over TCP segments or chunks would be cut short. A
    body still arriving is read holding at most limit + 1 bytes, so a chunked body is
    refused once it passes the limit; one that has all arrived is taken as it is.
    `any_coding`: a body in a content coding aiohttp does not decode is taken as it came
    (the gateway hands it on), not refused."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    if not any_coding:
        _known_coding(request)
    content = request.content
    body: bytes | bytearray
    try:
        if content.is_eof():
            # All of it has arrived (a short body comes in the packet of its headers): taken
            # at once, without a read that waits and the one more that finds the end.
            body = content.read_nowait()
        else:
            body = bytearray()
            while len(body) <= limit:
                piece = await content.read(limit + 1 - len(body))
                if not piece:
                    break
                body += piece
    except _UNREADABLE as exc:
        raise InvalidRequest(f"unreadable body: {_reason(exc)}") from None
    if len(body) > limit:
        raise _too_large(limit)
    return bytes(body)


async def json_body(request: web.Request, type_: type[T]) -> T:
    if request.content_type != "application/json":
        raise UnsupportedMediaType("the body must be application/json")
    body = await read_body(request)
    try:
        decoded = msgspec.json.decode(body, type=type_, strict=True)
        no_repeated_keys(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    except RecursionError:  # msgspec's answer to nesting deeper than it will follow
        raise InvalidRequest("malformed JSON: nested too deeply") from None
    return decoded


def no_repeated_keys(body: bytes) -> None:
    """InvalidRequest when an object of the JSON `body` (valid JSON) names a key twice, at
    any depth: msgspec keeps the last, and a proxy or a log that reads the first would see
    another request than the one acted on (RFC 8259 §4: names SHOULD be unique, and what
    a repeat means is unpredictable).

    Every key written ends in `"` then `:` (whitespace between), and so does nothing else
    but an escaped quote inside a string: when the keys decoded are as many as those ends,
    none was repeated. Only otherwise is the body parsed again, pair by pair (a third of
    the cost for the usual body: /policy/check's is on every API request)."""
    ends = len(_KEY_END.findall(body))
    if ends and ends != _keys(_generic.decode(body)):
        json.loads(body, object_pairs_hook=refuse_repeats)


_KEY_END = re.compile(rb'"[ \t\n\r]*:')
_generic = msgspec.json.Decoder()


def _keys(value: object) -> int:
    """How many keys the decoded objects hold, nested ones too."""
    if isinstance(value, dict):
        return len(value) + sum(_keys(v) for v in value.values())
    if isinstance(value, list):
        return sum(_keys(v) for v in value)
    return 0


def refuse_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The pairs as a dict; InvalidRequest when a key comes twice."""
    seen: set[str] = set()
    for key, _value in pairs:
        if key in seen:
            raise InvalidRequest(f"{key} is given more than once")
        seen.add(key)
    return dict(pairs)


def _describe(exc: msgspec.ValidationError) -> str:
    # msgspec says e.g. "Expected `str`, got `int` - at `$.name`": name the field first.
    message = str(exc)
    if " - at `$." in message:
        text, _, path = message.partition(" - at `$.")
        return f"{path.rstrip('`')}: {text}"
    return message


async def form_body(
    request: web.Request, limit: int = MAX_BODY, *, repeatable: frozenset[str] = frozenset()
) -> Form:
    """A form body (urlencoded or multipart); a malformed one is a 400, never a 500, and so
    is a field given more than once, unless it is `repeatable` (a list of checkboxes): a
    page would act on the first, and a proxy or a log that reads the last would see
    another request than the one acted on."""
    form = await _form_body(request, limit)
    if len(form) > len(form.keys()):  # the keys of a MultiDict are told once each
        seen: set[str] = set()
        for key, _value in form.items():
            if key in seen and key not in repeatable:
                raise InvalidRequest(f"{key} is given more than once")
            seen.add(key)
    return form


async def _form_body(request: web.Request, limit: int) -> Form:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    _known_coding(request)
    if request.content_type in _URLENCODED:
        return _urlencoded(await read_body(request, limit), request.charset or "utf-8")
    # aiohttp reads the whole form, piece by piece, but within its own client_max_size
    # (1 MiB): a chunked body, with no Content-Length to refuse up front, is held to ours.
    try:
        form = await request.clone(client_max_size=limit).post()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except _UNREADABLE_FORM as exc:
        raise InvalidRequest(f"unreadable form body: {_reason(exc)}") from None
    # aiohttp checks a multipart body's size while it reads the parts, not what follows them.
    if request.content.total_bytes > limit:
        raise _too_large(limit)
    _unicode(t for pair in form.items() for t in pair if isinstance(t, str) and not t.isascii())
    return form


# What aiohttp's post() reads as urlencoded: no Content-Type at all, or that one.
_URLENCODED = frozenset({"", "application/x-www-form-urlencoded"})
MAX_FIELDS = 1000  # aiohttp's client_max_fields

Form = MultiDictProxy[str | bytes | bytearray | web.FileField]


def _urlencoded(body: bytes, charset: str) -> Form:
    """The form as aiohttp's post() reads it (the same decoding, parser and field limit),
    without the copy of the request that reading it through post() within our limit took."""
    form: MultiDict[str | bytes | bytearray | web.FileField] = MultiDict(
        urlencoded_fields(body, charset)
    )
    return MultiDictProxy(form)


def urlencoded_fields(body: bytes, charset: str) -> list[tuple[str, str]]:
    """An urlencoded body's fields, in order, as aiohttp's post() decodes them."""
    try:
        text = body.rstrip().decode(charset)
    except (LookupError, ValueError) as exc:  # an unknown charset, or bytes not in it
        raise InvalidRequest(f"unreadable form body: {exc}") from None
    try:
        pairs = query_to_pairs(text, max_fields=MAX_FIELDS, encoding=charset)
    except ValueError:
        raise PayloadTooLarge(f"the form must have at most {MAX_FIELDS} fields") from None
    if not text.isascii() or "%" in text:
        _unicode(text for pair in pairs for text in pair if not text.isascii())
    return pairs


def _unicode(texts: Iterable[str]) -> None:
    """Refuses a field that decoded to a lone surrogate: a charset the client names may
    make one (UTF-7's `+2AA-`, or UTF-16's bytes), and no hash, password check or page
    that encodes the text afterwards survives it."""
    for text in texts:
        try:
            text.encode()
        except UnicodeEncodeError:
            raise InvalidRequest(
                "unreadable form body: a field holds a lone surrogate, which is no Unicode text"
            ) from None
