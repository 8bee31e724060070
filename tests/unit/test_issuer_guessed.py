"""A service others reach, started without PUBLIC_URL, says at start that its issuer is a
guess: its clients read every endpoint and `iss` from it."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from service.settings import Settings
from service.web.server import issuer_guessed


@pytest.mark.parametrize(
    ("host", "public_url", "warned"),
    [
        ("0.0.0.0", None, True),
        ("::", None, True),
        ("192.0.2.10", None, True),
        ("tollgate.internal", None, True),
        ("127.0.0.1", None, False),
        ("::1", None, False),
        ("localhost", None, False),
        ("0.0.0.0", "https://auth.example.com", False),
    ],
)
def test_the_issuer_from_the_listening_address_is_warned_of(host, public_url, warned):
    with capture_logs() as logs:
        issuer_guessed(Settings(host=host, public_url=public_url))
    said = [e for e in logs if e["event"] == "service.issuer_from_listen_address"]
    assert bool(said) is warned, logs
    if warned:
        assert said[0]["log_level"] == "warning"
        assert said[0]["issuer"] == Settings(host=host).issuer


@pytest.mark.parametrize(
    ("public_url", "warned"),
    [("https://example.com/auth", True), ("https://auth.example.com", False), (None, False)],
)
def test_an_issuer_with_a_path_is_warned_of(public_url, warned):
    """It works only behind a proxy that strips the path and passes the metadata's
    RFC 8414 §3.1 location, and with the pages reached from the host's root."""
    with capture_logs() as logs:
        issuer_guessed(Settings(host="127.0.0.1", public_url=public_url))
    said = [e for e in logs if e["event"] == "service.issuer_has_path"]
    assert bool(said) is warned, logs
    if warned:
        assert said[0]["log_level"] == "warning"
        assert "/.well-known/oauth-authorization-server/auth" in said[0]["detail"]
