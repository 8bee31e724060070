"""The public keys an application signs its client assertions with (RFC 7523 §2.2), and
how it authenticates at the token endpoint (RFC 7591 §2 `token_endpoint_auth_method`).

Only public keys are registered: a JWK with private members is refused, since the server
never needs them and must never hold them. Several keys at once let an application add a
new key before it removes the old one.
https://www.rfc-editor.org/rfc/rfc7591#section-2"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from joserfc import jwk
from joserfc.errors import JoseError

from service import events as ev
from service.errors import InvalidRequest, NotFound

CLIENT_SECRET_BASIC = "client_secret_basic"  # noqa: S105 -- a method's name
CLIENT_SECRET_POST = "client_secret_post"  # noqa: S105 -- a method's name
PRIVATE_KEY_JWT = "private_key_jwt"
#: A public client (RFC 8252 native apps): no secret, no key; PKCE instead
NONE = "none"
SECRET_METHODS = (CLIENT_SECRET_BASIC, CLIENT_SECRET_POST)
AUTH_METHODS = (*SECRET_METHODS, PRIVATE_KEY_JWT, NONE)

#: The signing algorithms a client assertion may use: asymmetric only (a symmetric key
#: would be a shared secret; `none` is no signature at all).
SIGNING_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                      "ES512", "EdDSA", "Ed25519", "Ed448")  # fmt: skip
_ALGORITHMS_OF = {
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "EC": ("ES256", "ES384", "ES512"),
    # EdDSA names no curve; Ed25519 and Ed448 are its fully specified names (RFC 9864)
    "OKP": ("EdDSA", "Ed25519", "Ed448"),
}
_CURVES = {"EC": ("P-256", "P-384", "P-521"), "OKP": ("Ed25519", "Ed448")}
_PUBLIC_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}
#: Members that only a private (or symmetric) key has (RFC 7518 §6.2.2, §6.3.2, §6.4;
#: RFC 8037 §2).
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
MIN_RSA_BITS = 2048
#: past it a key only costs: each verification's work grows with the modulus (and with
#: the public exponent, below 2**32 here, as every key in use is: 65537, or 3)
MAX_RSA_BITS = 8192
MAX_RSA_EXPONENT = 2**32
MAX_KEYS = 10
MAX_KID = 200


class KeyRefused(InvalidRequest):
    """A key that cannot be registered; said in the admin API's 400."""

    def __init__(self, message: str) -> None:
        super().__init__(f"jwks: {message}")


@dataclass(frozen=True)
class ClientKey:
    """A registered public key: its id, RFC 7638 thumbprint, and public JWK members."""

    kid: str
    thumbprint: str
    jwk: dict[str, str]


_claims = msgspec.json.Decoder(dict[str, Any])


def jwt_claims(payload: bytes) -> dict[str, Any] | None:
    """A signed JWT's claims set, a JSON object (RFC 7519 §7.2 item 10), read as JSON and
    nothing looser: None for NaN or Infinity, a number beyond a double, or text holding a
    lone surrogate, all of which Python's json module reads (and no comparison, int() or
    encode() after it survives)."""
    try:
        return _claims.decode(payload)
    except msgspec.DecodeError:
        return None


def auth_method(value: str) -> str:
    if value not in AUTH_METHODS:
        raise InvalidRequest(
            f"token_endpoint_auth_method: must be one of {', '.join(AUTH_METHODS)}"
        )
    return value


def public_key(data: Any) -> ClientKey:
    """A JWK as registered: checked to be a public signing key Tollgate can verify with,
    reduced to its public members, named by its `kid` (its thumbprint when it has none)."""
    if not isinstance(data, Mapping):
        raise KeyRefused("each key must be a JSON object (a JWK, RFC 7517)")
    private = [m for m in PRIVATE_MEMBERS if m in data]
    if private:
        raise KeyRefused(
            f"the key holds private key material ({', '.join(repr(m) for m in private)}): "
            "register the public key only, and keep the private key with the client"
        )
    kty = data.get("kty")
    if not isinstance(kty, str) or kty not in _PUBLIC_MEMBERS:
        raise KeyRefused("kty must be RSA, EC or OKP (a public signing key)")
    if data.get("use", "sig") != "sig":
        raise KeyRefused('use must be "sig": the key signs client assertions')
    alg = data.get("alg")
    if alg is not None and alg not in _ALGORITHMS_OF[kty]:
        raise KeyRefused(f"alg {alg!r} is not one of {', '.join(_ALGORITHMS_OF[kty])} for {kty}")
    members = {m: data.get(m) for m in _PUBLIC_MEMBERS[kty]}
    if not all(isinstance(v, str) and v for v in members.values()):
        raise KeyRefused(f"a {kty} key needs {', '.join(_PUBLIC_MEMBERS[kty])}")
    if kty in _CURVES and members["crv"] not in _CURVES[kty]:
        raise KeyRefused(f"crv must be one of {', '.join(_CURVES[kty])} for {kty}")
    public: dict[str, str] = {"kty": kty, **members}  # type: ignore[dict-item]
    try:
        material: dict[str, str | list[str]] = dict(public)
        key = jwk.import_key(material)
    except (JoseError, ValueError, TypeError):
        raise KeyRefused("not a valid public key") from None
    if kty == "RSA" and (problem := rsa_problem(public["n"], public["e"])) is not None:
        raise KeyRefused(problem)
    thumbprint = key.thumbprint()
    kid = data.get("kid", thumbprint)
    if not isinstance(kid, str) or not 1 <= len(kid) <= MAX_KID or not kid.isprintable():
        raise KeyRefused(f"kid must be 1 to {MAX_KID} printable characters")
    public["kid"] = kid
    if alg is not None:
        public["alg"] = alg
    public["use"] = "sig"
    return ClientKey(kid, thumbprint, public)


def rsa_problem(n: str, e: str) -> str | None:
    """Why an RSA public key (its base64url `n` and `e`) is refused, or None: a modulus
    that can be factored, or one, or an exponent, that makes each verification costly."""
    bits = _integer(n).bit_length()
    if bits < MIN_RSA_BITS:
        return f"an RSA key must have at least {MIN_RSA_BITS} bits"
    if bits > MAX_RSA_BITS:
        return f"an RSA key must have at most {MAX_RSA_BITS} bits"
    exponent = _integer(e)
    if not 3 <= exponent < MAX_RSA_EXPONENT or exponent % 2 == 0:
        return "an RSA key's public exponent must be odd, at least 3 and below 2**32 (65537)"
    return None


def _integer(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))


def jwks(data: Any) -> list[ClientKey]:
    """A JWK Set (RFC 7517 §5: `{"keys": [...]}`) as registered keys."""
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        raise KeyRefused('must be a JWK Set: {"keys": [...]}')
    keys: list[ClientKey] = []
    for item in data["keys"]:
        keys.append(_distinct(public_key(item), keys))
    return keys


def _distinct(key: ClientKey, registered: Sequence[ClientKey]) -> ClientKey:
    if any(k.kid == key.kid for k in registered):
        raise KeyRefused(f"a key with kid {key.kid!r} is already registered")
    if any(k.thumbprint == key.thumbprint for k in registered):
        raise KeyRefused("this key is already registered (same thumbprint)")
    if len(registered) >= MAX_KEYS:
        raise KeyRefused(f"an application may have at most {MAX_KEYS} keys; remove one first")
    return key


def add(
    company_id: str, client_id: str, registered: Sequence[ClientKey], new: Sequence[ClientKey]
) -> list[ev.Event]:
    """One ClientKeyAdded per new key; refuses a kid or a key already registered."""
    out: list[ev.Event] = []
    keys = list(registered)
    for key in new:
        keys.append(_distinct(key, keys))
        out.append(
            ev.ClientKeyAdded(
                company_id=company_id,
                client_id=client_id,
                kid=key.kid,
                thumbprint=key.thumbprint,
                jwk=dict(key.jwk),
            )
        )
    return out


def remove(
    company_id: str, client_id: str, registered: Sequence[ClientKey], kid: str
) -> ev.ClientKeyRemoved:
    for key in registered:
        if key.kid == kid:
            return ev.ClientKeyRemoved(
                company_id=company_id, client_id=client_id, kid=kid, thumbprint=key.thumbprint
            )
    raise NotFound("no such key")


def method_change(
    company_id: str, client_id: str, before: str, after: str | None
) -> list[ev.Event]:
    if after is None or auth_method(after) == before:
        return []
    return [
        ev.TokenEndpointAuthMethodChanged(
            company_id=company_id, client_id=client_id, before=before, after=after
        )
    ]
