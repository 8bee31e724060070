"""Public clients: native apps that cannot keep a secret (RFC 8252). They authenticate with
their client_id alone (`token_endpoint_auth_method` "none"), so what stands in for a
secret is PKCE on every authorization request, and a loopback redirect URI may name any
port, since the app listens on whichever one is free when it asks.
https://www.rfc-editor.org/rfc/rfc8252#section-7.3"""

from __future__ import annotations

from urllib.parse import urlsplit

from service.domain.client_keys import NONE
from service.domain.state import AppState, CodeState
from service.oauth.errors import InvalidGrant

#: RFC 8252 §7.3: loopback IP literals; "localhost" is not one (§8.3: it may resolve
#: elsewhere), so a localhost redirect URI is matched exactly, port and all.
LOOPBACK_IPS = frozenset({"127.0.0.1", "::1"})


def is_public(app: AppState) -> bool:
    return app.auth_method == NONE


def redirect_matches(app: AppState, registered: str, presented: str) -> bool:
    """Exact string match (RFC 9700 §4.1.3), except that a public client's loopback IP
    redirect URI matches with any port (RFC 8252 §7.3): scheme, address, path and query
    stay exactly as registered."""
    if presented == registered:
        return True
    if not is_public(app):
        return False
    try:
        want, got = urlsplit(registered), urlsplit(presented)
        port = got.port
    except ValueError:
        return False
    if want.scheme != "http" or want.hostname not in LOOPBACK_IPS:
        return False
    host = f"[{want.hostname}]" if ":" in want.hostname else want.hostname
    # The presented authority rebuilt from its parts must be what was sent: no userinfo,
    # no second host hidden in it, no spelling of the address other than the registered.
    netloc = host if port is None else f"{host}:{port}"
    return (
        got.scheme == "http"
        and got.netloc == netloc
        and (got.path, got.query, got.fragment) == (want.path, want.query, want.fragment)
        and "#" not in presented
    )


def redirect_uri_needed(app: AppState) -> bool:
    """Whether an authorization request must name the redirect URI. An application has one
    registered URI, so RFC 6749 §3.1.2.3 lets a request leave it out, except a public
    client's loopback one: its port is the one the app listens on (RFC 8252 §7.3), which
    only the request can say."""
    if not is_public(app) or not app.redirect_uri:
        return False
    try:
        registered = urlsplit(app.redirect_uri)
    except ValueError:
        return True
    return registered.scheme == "http" and registered.hostname in LOOPBACK_IPS


def require_pkce(app: AppState, code: CodeState | None) -> None:
    """A public client's code is redeemed only with PKCE (RFC 8252 §8.1, RFC 9700 §2.1.1):
    a code issued without a challenge (before the application became public) is refused."""
    if is_public(app) and code is not None and code.code_challenge is None:
        raise InvalidGrant("a public client's authorization code needs PKCE (code_challenge)")
