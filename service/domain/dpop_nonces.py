"""DPoP server nonces (RFC 9449 §8, §9), pure: what a nonce looks like, when a process hands
out a new one, and whether a proof's nonce is accepted. The caller passes the time and what
the store knows of the nonce (service/storage/dpop_nonces.py keeps the digests).
https://www.rfc-editor.org/rfc/rfc9449#section-8"""

from __future__ import annotations

import hashlib
import secrets
import string

#: random bytes in a nonce: 192 bits, unguessable
NONCE_BYTES = 24
#: characters of secrets.token_urlsafe(NONCE_BYTES): base64url, no padding
NONCE_LENGTH = 32
_ALPHABET = frozenset(string.ascii_letters + string.digits + "-_")
#: a process hands out a new nonce once this share of the lifetime has passed, so a nonce
#: it hands out has at least the rest of its lifetime to be used in
ROTATE_AFTER = 1 / 3

ASK = "use the nonce in the DPoP-Nonce header"


def new_nonce() -> str:
    """A fresh nonce (RFC 9449 §8.1: unpredictable, of the token68 characters)."""
    return secrets.token_urlsafe(NONCE_BYTES)


def well_formed(nonce: str) -> bool:
    """Whether `nonce` could be one this server handed out: anything else is refused before
    any lookup."""
    return len(nonce) == NONCE_LENGTH and all(c in _ALPHABET for c in nonce)


def digest(nonce: str) -> bytes:
    """What is stored and compared: the SHA-256 of the nonce, never the nonce itself."""
    return hashlib.sha256(nonce.encode()).digest()


def rotation_due(issued_at: float, now: float, lifetime: float) -> bool:
    """Whether the nonce a process hands out, made at `issued_at`, is to be replaced."""
    return now - issued_at >= lifetime * ROTATE_AFTER


def refusal(nonce: str | None, expires_at: float | None, now: float) -> str | None:
    """Why a proof's nonce is refused, None when it is accepted. `expires_at`: when the
    nonce stops being accepted, as the store knows it; None: never issued here (or already
    pruned, long expired). A nonce is accepted by every process until it expires, any
    number of times: the proof's jti, not the nonce, makes each proof single use."""
    if nonce is None:
        return f"this server requires a nonce in the DPoP proof: {ASK}"
    if expires_at is None or not well_formed(nonce):
        return f"the DPoP proof's nonce was not issued by this server: {ASK}"
    if now >= expires_at:
        return f"the DPoP proof's nonce has expired: {ASK}"
    return None
