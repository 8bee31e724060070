"""User passwords: argon2id (memory-hard), via argon2-cffi."""

from __future__ import annotations

import argon2

from service.domain.credentials import random_token

MIN_LENGTH = 12
MAX_LENGTH = 256

#: argon2id with RFC 9106's second recommended option (3 passes over 64 MiB, 4 lanes): about
#: a tenth of a second a hash on one core
PROFILE = argon2.profiles.RFC_9106_LOW_MEMORY

_hasher = argon2.PasswordHasher.from_parameters(PROFILE)


class WeakPassword(ValueError):
    pass


def check_strength(password: str) -> None:
    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"password must be at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise WeakPassword(f"password must be at most {MAX_LENGTH} characters")


def hash_password(password: str) -> str:
    """Slow on purpose (tens of milliseconds): call it off the event loop."""
    return _hasher.hash(password)


def verify_password(password: str, stored_hash: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def generate_password() -> str:
    return random_token(18)  # 24 characters, 144 bits


# A hash of nothing anyone knows: checked against when a login names an unknown user, so
# that the answer takes as long as for a known one.
DUMMY_HASH = _hasher.hash(random_token(18))
