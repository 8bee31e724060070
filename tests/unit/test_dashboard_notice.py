"""The dashboard's shown-once notice: sealed with the session, readable by nobody else."""

from __future__ import annotations

import base64

from service.web.dashboard import once

SECRET = "tgs_" + "s" * 40


def test_a_sealed_notice_opens_for_its_own_session() -> None:
    notice = once.Notice("Secret rotated.", secret_label="Client secret", secret=SECRET)
    assert once.unseal("session-a", once.seal("session-a", notice)) == notice


def test_the_cookie_does_not_carry_the_secret_readable() -> None:
    sealed = once.seal("session-a", once.Notice("m", secret=SECRET))
    raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
    assert SECRET not in sealed
    assert SECRET.encode() not in raw


def test_two_seals_of_one_notice_differ() -> None:
    notice = once.Notice("m", secret=SECRET)
    assert once.seal("session-a", notice) != once.seal("session-a", notice)


def test_another_sessions_notice_does_not_open() -> None:
    assert once.unseal("session-b", once.seal("session-a", once.Notice("m"))) is None


def test_an_altered_notice_does_not_open() -> None:
    sealed = once.seal("session-a", once.Notice("m", secret=SECRET))
    raw = bytearray(base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4)))
    raw[len(raw) // 2] ^= 1
    altered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    assert once.unseal("session-a", altered) is None


def test_garbage_does_not_open() -> None:
    for value in ("", "not base64 !", "AAAA", "A" * 200):
        assert once.unseal("session-a", value) is None
