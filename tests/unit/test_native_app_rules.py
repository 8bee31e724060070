"""Public clients (RFC 8252): a loopback IP redirect URI matches with any port, and only
for them; their codes need PKCE; the method is for users' grants only."""

from __future__ import annotations

import msgspec
import pytest

from service.domain import applications as rules
from service.domain import native_apps
from service.domain.applications import FieldError
from service.oauth.errors import InvalidGrant
from tests.unit.rules import app, code

PUBLIC = msgspec.structs.replace(app("authorization_code"), auth_method="none")
CONFIDENTIAL = app("authorization_code")


@pytest.mark.parametrize(
    ("registered", "presented"),
    [
        ("http://127.0.0.1/cb", "http://127.0.0.1:50000/cb"),
        ("http://127.0.0.1:8080/cb", "http://127.0.0.1/cb"),
        ("http://127.0.0.1/cb?a=1", "http://127.0.0.1:1/cb?a=1"),
        ("http://[::1]/cb", "http://[::1]:65535/cb"),
        ("https://app.example/cb", "https://app.example/cb"),  # exact, as for everyone
    ],
)
def test_a_public_clients_loopback_uri_matches_with_any_port(registered, presented):
    assert native_apps.redirect_matches(PUBLIC, registered, presented)


@pytest.mark.parametrize(
    ("registered", "presented"),
    [
        ("http://127.0.0.1/cb", "http://127.0.0.1:5000/cb/"),
        ("http://127.0.0.1/cb", "http://127.0.0.1:5000/CB"),
        ("http://127.0.0.1/cb", "http://127.000.000.001:5000/cb"),
        ("http://127.0.0.1/cb", "http://user@127.0.0.1:5000/cb"),
        ("http://127.0.0.1/cb", "http://127.0.0.1:5000/cb#frag"),
        ("http://127.0.0.1/cb", "http://127.0.0.1:abc/cb"),
        ("http://127.0.0.1/cb", "http://[::1]:5000/cb"),
        ("http://localhost/cb", "http://localhost:5000/cb"),  # a name: exact only
        ("https://app.example/cb", "https://app.example:8443/cb"),
    ],
)
def test_anything_else_about_a_loopback_uri_must_match_exactly(registered, presented):
    assert not native_apps.redirect_matches(PUBLIC, registered, presented)


def test_a_confidential_client_gets_exact_matching_only():
    assert not native_apps.redirect_matches(
        CONFIDENTIAL, "http://127.0.0.1/cb", "http://127.0.0.1:5000/cb"
    )


def test_a_public_clients_code_needs_a_challenge():
    with pytest.raises(InvalidGrant, match="PKCE"):
        native_apps.require_pkce(PUBLIC, code(challenge=None))
    native_apps.require_pkce(PUBLIC, code(challenge="x" * 43))
    native_apps.require_pkce(CONFIDENTIAL, code(challenge=None))
    native_apps.require_pkce(PUBLIC, None)  # unknown: the grant says so


def test_none_is_for_authorization_code_applications_only():
    assert rules.auth_method("authorization_code", "none") == "none"
    with pytest.raises(FieldError, match="authorization_code applications only"):
        rules.auth_method("client_credentials", "none")
    assert not rules.has_secret("none")
    assert not rules.has_secret("private_key_jwt")
    assert rules.has_secret("client_secret_post")
