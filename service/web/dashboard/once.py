"""What the dashboard shows once after a change (a message, a new secret), carried across
the redirect that follows the form in a cookie sealed with the session's own cookie."""

from __future__ import annotations

import base64
import binascii
import secrets

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

COOKIE = "tg_dashboard_once"
PATH = "/dashboard"
MAX_AGE = 300  # the redirect follows at once; an abandoned notice dies soon after
_NONCE = 12  # AES-GCM's standard nonce; random, and each key seals a handful of notices
_INFO = b"tollgate dashboard notice v1"


class Notice(msgspec.Struct, frozen=True):
    """`secret`: a credential shown this once (`secret_label` names it)."""

    message: str
    secret_label: str = ""
    secret: str = ""


# Why sealed, and with what: the secret must survive one redirect (so that reloading the
# page cannot submit the form again) without being stored by the service, and without
# lying readable in the browser's cookie jar. The key is derived (HKDF-SHA256) from the
# session cookie's value, which the service keeps only as a digest: the notice opens for
# that session and nobody else, and is worth nothing once the session ends. The cipher is
# AES-256-GCM from `cryptography`: authenticated encryption, no home-made construction.


def _aead(session_value: str) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
        session_value.encode()
    )
    return AESGCM(key)


def seal(session_value: str, notice: Notice) -> str:
    nonce = secrets.token_bytes(_NONCE)
    sealed = _aead(session_value).encrypt(nonce, msgspec.json.encode(notice), COOKIE.encode())
    return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")


def unseal(session_value: str, sealed: str) -> Notice | None:
    """The notice, if this session sealed it; anything else (altered, another session's,
    not base64) is None."""
    try:
        raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) <= _NONCE + 16:  # a nonce and GCM's 16-byte tag, and something sealed
        return None
    try:
        plain = _aead(session_value).decrypt(raw[:_NONCE], raw[_NONCE:], COOKIE.encode())
        return msgspec.json.decode(plain, type=Notice)
    except (InvalidTag, msgspec.DecodeError):
        return None
