"""Generated identifiers and secrets, and how they are stored and compared.

Client secrets, admin keys and resource-server keys are 256-bit random values: a single
SHA-256 is the right storage hash for them (a slow password KDF protects low-entropy
input; these have none to protect), and comparisons are constant-time. Keys and tokens
that a person may paste somewhere carry a recognisable prefix, so leaked ones are easy
to scan for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

ADMIN_KEY_PREFIX = "tgadm_"
RESOURCE_SERVER_KEY_PREFIX = "tgrs_"


def random_token(nbytes: int = 32) -> str:
    """`nbytes` random bytes, base64url without padding (32 bytes → 43 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(nbytes)).rstrip(b"=").decode()


def new_client_id() -> str:
    return random_token(32)


def new_client_secret() -> str:
    return random_token(32)


def new_admin_key() -> str:
    return ADMIN_KEY_PREFIX + random_token(32)


def new_resource_server_key() -> str:
    return RESOURCE_SERVER_KEY_PREFIX + random_token(32)


def new_id(prefix: str) -> str:
    """A public identifier (not a secret): company, user, key, family ids."""
    return f"{prefix}_{random_token(12)}"


def digest(secret: str) -> str:
    """The stored form of a high-entropy secret: SHA-256, hex."""
    # surrogateescape: a header with bytes that are not UTF-8 reaches here as lone
    # surrogates; it must hash (to nothing anyone knows), not raise.
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    """Constant-time check of a presented secret against its stored digest."""
    return hmac.compare_digest(digest(secret), stored_digest)
