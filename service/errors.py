"""One error hierarchy for the whole service; the web layer renders it, once.

Each error carries the RFC error code (`error`), the HTTP status and a description; the
OAuth ones follow RFC 6749 §5.2 (https://www.rfc-editor.org/rfc/rfc6749#section-5.2).
"""

from __future__ import annotations

import re

#: what an error_description may hold (RFC 6749 §5.2: %x20-21 / %x23-5B / %x5D-7E)
_NOT_RFC6749 = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def rfc6749_text(description: str) -> str:
    """`description` in the characters RFC 6749 §5.2 allows an error_description: no
    non-ASCII, no '"' or '\\' (which would also end or escape a challenge's quoted-string,
    RFC 6750 §3). "§" is spelled out, quotes become single ones, anything else is "?"."""
    text = description.replace("§", "section ").replace('"', "'").replace("\\", "/")
    return _NOT_RFC6749.sub("?", text)


class TollgateError(Exception):
    error = "server_error"
    status = 500
    headers: dict[str, str] = {}

    def __init__(self, description: str = "", *, headers: dict[str, str] | None = None) -> None:
        super().__init__(description or self.error)
        self.description = description
        if headers is not None:
            self.headers = headers


class InvalidRequest(TollgateError):
    error = "invalid_request"
    status = 400


class NotFound(TollgateError):
    error = "not_found"
    status = 404


class MethodNotAllowed(TollgateError):
    error = "method_not_allowed"
    status = 405


class UnsupportedMediaType(TollgateError):
    error = "unsupported_media_type"
    status = 415


class PayloadTooLarge(TollgateError):
    error = "request_too_large"
    status = 413


class Unavailable(TollgateError):
    error = "temporarily_unavailable"
    status = 503


class Unauthorized(TollgateError):
    """RFC 6750 §3.1: no credentials, or credentials that are not valid."""

    error = "invalid_token"
    status = 401

    def __init__(
        self, description: str = "", *, realm: str = "tollgate", sent: bool | None = None
    ) -> None:
        # `sent`: whether credentials came at all; without them the challenge names no
        # error (RFC 6750 §3.1). By default: whether there is something to describe.
        description = rfc6749_text(description)
        challenge = f'Bearer realm="{realm}"'
        if description and (sent is None or sent):
            challenge += f', error="invalid_token", error_description="{description}"'
        super().__init__(description, headers={"WWW-Authenticate": challenge})


class Forbidden(TollgateError):
    error = "forbidden"
    status = 403


class Conflict(TollgateError):
    error = "conflict"
    status = 409


class PreconditionFailed(TollgateError):
    error = "precondition_failed"
    status = 412
