"""What every request pays for its log line, made cheap without changing what it says: the
cheap look that decides whether a value needs redacting, and request ids read from the
system's random source in bulk."""

from __future__ import annotations

import random
import re

from service.logs import _SUSPECT, _suspect, redact_text
from service.web.middleware import _RequestIds

_PIECES = ["tgat_", "TgRt_", "tg_", "BEARER", "basic", "Cookie", "client_SECRET", "password",
           "code", "Code_Verifier", "refresh_token", "ACCESS_TOKEN", "token", "/api/v1/x",
           "192.0.2.1", "GET", "t", "g", "to", "ken", "co", "de", "_", " ", "=", ":"]  # fmt: skip


def test_the_cheap_look_misses_nothing_the_regex_would_find():
    rng = random.Random(7)
    for _ in range(20_000):
        text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 6)))
        if _SUSPECT.search(text):
            assert _suspect(text), text


def test_ordinary_values_are_not_suspect():
    for text in ("http.request", "GET", "/api/v1/whoami", "192.0.2.1", "2026-12-03T09:00:00Z"):
        assert not _suspect(text)
        assert redact_text(text) == text


def test_credentials_are_redacted_whatever_their_case_and_the_text_around_them():
    assert "abc" not in redact_text("Authorization: BeArEr abcdefgh")
    assert "tgat_secretvalue" not in redact_text("sent tgat_secretvalue in the path")
    # Text beyond ASCII goes to the regex itself (its case folding is not str.lower's).
    assert "abcdefgh" not in redact_text("café Authorization: Bearer abcdefgh")
    assert "hunter2" not in redact_text("naïve PASSWORD=hunter2")


def test_request_ids_are_random_hex_and_never_repeat_across_reads():
    ids = _RequestIds()
    made = [ids() for _ in range(3 * _RequestIds._PER_READ + 5)]  # several reads
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in made)
    assert len(set(made)) == len(made)
    other = _RequestIds()
    assert not set(made) & {other() for _ in range(100)}


def test_lines_are_written_in_whole_lines_of_at_most_the_atomic_write_size():
    from service.logs import _chunks

    rng = random.Random(3)
    lines = [
        ("é" * rng.randint(0, 300) + "x" * rng.randint(0, 900)).encode() + b"\n" for _ in range(200)
    ] + [b"y" * 5000 + b"\n"]  # longer than a write may be: alone, whole
    rng.shuffle(lines)
    data = b"".join(lines)
    chunks = list(_chunks(data, 4096))
    assert b"".join(chunks) == data
    for chunk in chunks:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= 4096 or chunk.count(b"\n") == 1
    assert len(chunks) < len(lines) / 2  # several lines a write
    assert list(_chunks(b"", 4096)) == []
