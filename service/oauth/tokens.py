"""Opaque credentials: access tokens, refresh tokens and authorization codes.

`<prefix><43 characters of base64url: 256 random bits><6 characters: CRC-32>`. The prefix
makes a leaked token recognisable to secret scanners; the checksum lets a malformed or
truncated token be refused without touching any storage. Only SHA-256 digests of them
are ever stored or logged.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zlib

from service.domain.credentials import digest, random_token

ACCESS = "tgat_"
REFRESH = "tgrt_"
CODE = "tgac_"

_SHAPE = re.compile(r"^(tgat_|tgrt_|tgac_)[A-Za-z0-9_-]{43}([A-Za-z0-9_-]{6})\Z")


def _checksum(body: str) -> str:
    crc = zlib.crc32(body.encode()).to_bytes(4, "big")
    return base64.urlsafe_b64encode(crc).rstrip(b"=").decode()


def new(prefix: str) -> str:
    body = prefix + random_token(32)
    return body + _checksum(body)


def well_formed(token: str, prefix: str) -> bool:
    """Shape and checksum only: a cheap first filter before any lookup."""
    if len(token) != len(prefix) + 49 or not token.startswith(prefix):
        return False
    match = _SHAPE.match(token)
    return match is not None and _checksum(token[:-6]) == match.group(2)


def token_hash(token: str) -> str:
    return digest(token)


def token_key(token: str) -> bytes:
    """The access-token key of the read model: the SHA-256 of `token_hash`, as bytes."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
