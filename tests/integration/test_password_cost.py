"""The product hashes passwords at RFC 9106's low-memory argon2id cost. The test session
hashes at the least cost (tests/conftest.py), so the product's cost is checked here, in a
process of its own that imports the service as it runs."""

from __future__ import annotations

import subprocess
import sys

import argon2

from service.domain import passwords

_HASH_IN_A_FRESH_PROCESS = """
from service.domain import passwords
print(passwords.hash_password("correct horse battery staple"))
print(passwords.DUMMY_HASH)
"""


def test_the_service_hashes_passwords_at_the_rfc_9106_low_memory_cost() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _HASH_IN_A_FRESH_PROCESS],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    made, dummy = done.stdout.split()
    for stored in (made, dummy):  # an unknown user's check costs what a known one's does
        assert stored.startswith(passwords.NFKC_MARK + "$argon2id$")  # made from the NFKC form
        parameters = argon2.extract_parameters(stored.removeprefix(passwords.NFKC_MARK))
        assert parameters.type is argon2.Type.ID
        assert (parameters.time_cost, parameters.memory_cost, parameters.parallelism) == (
            3,
            64 * 1024,
            4,
        )
    assert passwords.PROFILE == argon2.profiles.RFC_9106_LOW_MEMORY
    # Made at the product's cost, checked by this session's cheaper hasher: a hash
    # carries its own parameters.
    assert passwords.verify_password("correct horse battery staple", made)
    assert not passwords.verify_password("correct horse battery stapler", made)


def test_this_session_hashes_cheaply_in_the_same_format() -> None:
    stored = passwords.hash_password("correct horse battery staple")
    assert stored.startswith("nfkc$argon2id$v=19$m=8,t=1,p=1$")
    assert passwords.verify_password("correct horse battery staple", stored)
    assert not passwords.verify_password("correct horse battery stapl", stored)
