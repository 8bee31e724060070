"""What the application page's "Client authentication" section shows and reads: the
methods the rules allow for the grant, the registered keys as rows, the settings form as
a Patch, and a pasted JWK or JWK Set as the JSON the command handler checks."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from service.domain import applications as rules
from service.domain import client_keys
from service.domain.applications import FieldError
from service.errors import InvalidRequest
from service.web.dashboard.base import Form

DESCRIPTIONS = {
    client_keys.CLIENT_SECRET_BASIC: "the client secret, in HTTP Basic (the default)",
    client_keys.CLIENT_SECRET_POST: "the client secret, in the form body",
    client_keys.PRIVATE_KEY_JWT: "a JWT signed with one of the application's keys "
    "(RFC 7523); no secret",
    client_keys.NONE: "none: a public client (a native app) that proves itself with PKCE",
}
#: Enough for any limit the rules accept (at most 10,000,000); longer is refused unread.
_MAX_DIGITS = 12


def methods(grant_type: str) -> list[tuple[str, str]]:
    """The methods the rules accept for `grant_type`, as (name, description): the same
    check the admin API's PATCH makes, so the page offers nothing it would refuse."""
    allowed = []
    for method in client_keys.AUTH_METHODS:
        try:
            rules.auth_method(grant_type, method)
        except InvalidRequest:
            continue
        allowed.append((method, DESCRIPTIONS[method]))
    return allowed


def values(app: rules.Application) -> dict[str, Any]:
    """The settings form as the application has it."""
    limit = app.cc_token_limit
    return {
        "method": app.token_endpoint_auth_method,
        "dpop": app.dpop_bound_access_tokens,
        "cc_token_limit": "" if limit is None else str(limit),
    }


def typed(form: Form) -> dict[str, Any]:
    """The settings form as it was sent, to show again next to its error."""
    return {
        "method": form.get("token_endpoint_auth_method"),
        "dpop": form.get("dpop_bound_access_tokens") == "true",
        "cc_token_limit": form.get("cc_token_limit")[: _MAX_DIGITS * 2],
    }


def patch(form: Form) -> rules.Patch:
    """The settings form as a Patch. An unchecked box is not sent: DPoP off. The limit
    field, shown for client_credentials only, empty means the server's default; absent,
    the limit is left as it is."""
    method = form.get("token_endpoint_auth_method") or None
    limit: int | None = None
    clear = False
    if form.all("cc_token_limit"):
        raw = form.get("cc_token_limit").strip()
        if not raw:
            clear = True
        elif raw.isascii() and raw.isdigit() and len(raw) <= _MAX_DIGITS:
            limit = int(raw)
        else:
            raise FieldError(
                "cc_token_limit",
                "must be a whole number, 0 for no limit, or empty for the server's default",
            )
    return rules.Patch(
        token_endpoint_auth_method=method,
        dpop_bound_access_tokens=form.get("dpop_bound_access_tokens") == "true",
        cc_token_limit=limit,
        clear_cc_token_limit=clear,
    )


def pasted(text: str) -> object:
    """A pasted JWK or JWK Set as a JWK Set, for `client_keys.jwks` to check. What was
    pasted is never quoted back: it may be a private key."""
    stripped = text.strip()
    if not stripped:
        raise client_keys.KeyRefused("paste a public key (a JWK) or a JWK Set")
    if "PRIVATE KEY" in stripped:
        raise client_keys.KeyRefused(
            "that is a private key (PEM): paste the public key only, as a JWK"
        )
    try:
        data = msgspec.json.decode(stripped.encode())
    except UnicodeEncodeError:  # a lone surrogate, from bytes that were not UTF-8
        raise client_keys.KeyRefused("not valid JSON (not UTF-8 text)") from None
    except msgspec.DecodeError as exc:
        # msgspec names a byte offset, never the text around it.
        raise client_keys.KeyRefused(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise client_keys.KeyRefused("not valid JSON (nested too deeply)") from None
    if isinstance(data, dict) and "keys" not in data:
        return {"keys": [data]}  # one JWK
    return data


@dataclass(frozen=True)
class KeyRow:
    kid: str
    kind: str
    alg: str
    thumbprint: str
    added_at: datetime | None


def row(key: client_keys.ClientKey, added_at: datetime | None) -> KeyRow:
    jwk = key.jwk
    kty = jwk.get("kty", "")
    if kty == "RSA":
        kind = f"RSA {_bits(jwk.get('n', ''))} bits"
    else:
        kind = f"{kty} {jwk.get('crv', '')}".strip()
    return KeyRow(key.kid, kind, jwk.get("alg", ""), key.thumbprint, added_at)


def _bits(modulus: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(modulus + "=" * (-len(modulus) % 4))
    except (binascii.Error, ValueError):
        return 0
    return int.from_bytes(raw).bit_length()
