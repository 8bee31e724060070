"""The pages' Content-Security-Policy: a form may end in a redirect to the application's
origin, and nothing in a redirect URI can change the policy's shape."""

from __future__ import annotations

import re

import pytest

from service.web.pages import SECURITY_HEADERS, redirect_source, security_headers


def directives(csp: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for directive in csp.split(";"):
        name, *sources = directive.split()
        assert name not in found, f"{name} given twice in {csp!r}"
        found[name] = sources
    return found


BASE = directives(SECURITY_HEADERS["Content-Security-Policy"])


@pytest.mark.parametrize(
    ("uri", "source"),
    [
        ("https://app.example/callback?provider=tollgate", "https://app.example"),
        ("https://App.Example:8443/cb", "https://app.example:8443"),
        ("https://app.example:443/cb", "https://app.example:443"),
        ("http://127.0.0.1:5000/callback", "http://127.0.0.1:5000"),
        ("http://localhost/callback", "http://localhost"),
        ("https://bücher.example/cb", "https://xn--bcher-kva.example"),
        # CSP cannot name an IPv6 literal (Chromium drops it as an invalid source): the
        # scheme is the narrowest source that still lets the browser follow.
        ("http://[::1]:8080/callback", "http:"),
        ("https://[2001:db8::1]/callback", "https:"),
        ("https://under_score.example/cb", "https:"),
    ],
)
def test_the_source_is_the_redirect_uris_origin(uri, source):
    assert redirect_source(uri) == source


@pytest.mark.parametrize(
    "uri", ["", "javascript:alert(1)", "ftp://files.example/", "https://a.example:99999/"]
)
def test_a_uri_that_is_not_http_adds_no_source(uri):
    assert redirect_source(uri) is None
    assert security_headers(uri) == SECURITY_HEADERS


HOSTILE = [
    "https://a.example;script-src 'unsafe-inline'/cb",
    "https://a.example, https://b.example/cb",
    "https://a.example b.example/cb",
    "https://a.example'/cb",
    'https://a.example"/cb',
    "https://a.example%3Bscript-src/cb",
    "https://a.example\r\nSet-Cookie: x=1/cb",
    "https://a.example\x00/cb",
    "https://*.example/cb",
    "http://127.0.0.1:80;/cb",
]


@pytest.mark.parametrize("uri", HOSTILE)
def test_nothing_in_a_redirect_uri_changes_the_shape_of_the_policy(uri):
    csp = security_headers(uri)["Content-Security-Policy"]
    assert "\r" not in csp and "\n" not in csp and "," not in csp
    found = directives(csp)
    assert found.keys() == BASE.keys()
    assert {k: v for k, v in found.items() if k != "form-action"} == {
        k: v for k, v in BASE.items() if k != "form-action"
    }
    self_, *extra = found["form-action"]
    assert self_ == "'self'"
    assert len(extra) <= 1
    assert all(re.fullmatch(r"https?:(//[a-z0-9.-]+(:\d+)?)?", source) for source in extra)


def test_only_form_action_widens_and_clickjacking_protection_stays():
    headers = security_headers("https://app.example/callback")
    found = directives(headers["Content-Security-Policy"])
    assert found["form-action"] == ["'self'", "https://app.example"]
    assert found["frame-ancestors"] == ["'none'"]
    assert found["default-src"] == ["'none'"]
    assert headers["X-Frame-Options"] == "DENY"
    assert {k: v for k, v in headers.items() if k != "Content-Security-Policy"} == {
        k: v for k, v in SECURITY_HEADERS.items() if k != "Content-Security-Policy"
    }
    assert BASE["form-action"] == ["'self'"]
