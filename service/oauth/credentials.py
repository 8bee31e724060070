"""The one parser of the Authorization header: HTTP Basic client credentials (RFC 6749
§2.3.1: form-urlencoded before base64) and Bearer values (RFC 6750 §2.1: access tokens,
admin keys, resource-server keys). Callers turn what it finds into their own errors.
https://www.rfc-editor.org/rfc/rfc6749#section-2.3.1"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import unquote_plus

import msgspec


# Structs, not dataclasses: one is built per request that carries credentials.
class Basic(msgspec.Struct, frozen=True, gc=False):
    client_id: str
    secret: str


class Bearer(msgspec.Struct, frozen=True, gc=False):
    value: str


class Unreadable(msgspec.Struct, frozen=True, gc=False):
    """A header that is there but holds no usable credentials: another scheme, an empty
    value, Basic that is not base64 of `id:secret`. `scheme` is what it claimed to be."""

    scheme: str


Credentials = Basic | Bearer | Unreadable


def parse(header: str | None) -> Credentials | None:
    """What the header holds; None when there is no header."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer":
        return Bearer(value) if value else Unreadable(scheme)
    if scheme == "basic":
        return _basic(value) or Unreadable(scheme)
    return Unreadable(scheme)


def _basic(value: str) -> Basic | None:
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, ValueError):  # also non-ASCII input, and bad UTF-8
        return None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return None
    # RFC 6749 §2.3.1: both parts are form-urlencoded before base64.
    return Basic(unquote_plus(client_id), unquote_plus(secret))
