"""DPoP proofs (RFC 9449): what makes a proof valid, the key it proves, and the binding of a
token to that key. Values in, a verdict out: the caller passes the time and what the
request was (method, URL, the access token it carries), and records the proof's single use.
https://www.rfc-editor.org/rfc/rfc9449#section-4.3"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import string
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from joserfc import jwk, jws
from joserfc.errors import JoseError

from service.domain.client_keys import (
    PRIVATE_MEMBERS,
    SIGNING_ALGORITHMS,
    jwt_claims,
    rsa_problem,
)
from service.errors import rfc6749_text
from service.oauth.errors import OAuthError

#: RFC 9449 §4.2: "typ": "dpop+jwt".
PROOF_TYPE = "dpop+jwt"
#: RFC 9449 §4.3 item 5: an asymmetric algorithm; none and HS* are refused before any key.
ALGORITHMS = SIGNING_ALGORITHMS
MAX_PROOF = 8192  # characters: an RS512 proof with a 4096-bit jwk is under 2,000
MAX_JTI = 256
#: Clock skew allowed on iat (RFC 9449 §11.1: "a reasonable window").
LEEWAY = 60
#: The oldest a proof may be: it is for one request, made just before it is sent.
MAX_AGE = 300
DEFAULT_PORTS = {"http": 80, "https": 443}
#: RFC 9449 §8.1: the header a server hands a nonce out in.
NONCE_HEADER = "DPoP-Nonce"


def _registry() -> jws.JWSRegistry:
    """joserfc's registry with room for the public key in the header: its default bound
    (512 bytes) is shorter than the jwk of an RSA key of 2048 bits."""
    registry = jws.JWSRegistry(algorithms=list(ALGORITHMS))
    registry.max_header_length = MAX_PROOF
    return registry


_REGISTRY = _registry()


class InvalidDpopProof(OAuthError):
    """At the token endpoint: 400 invalid_dpop_proof (RFC 9449 §5)."""

    error = "invalid_dpop_proof"


class UseDpopNonce(OAuthError):
    """At the token endpoint: 400 use_dpop_nonce, with the nonce to put in the next proof
    (RFC 9449 §8: "DPoP-Nonce" header). https://www.rfc-editor.org/rfc/rfc9449#section-8"""

    error = "use_dpop_nonce"

    def __init__(self, description: str, nonce: str) -> None:
        super().__init__(description, headers={NONCE_HEADER: nonce})
        self.nonce = nonce


#: the DPoP challenge's own parameter: the algorithms a proof may be signed with
ALGS = f'algs="{" ".join(ALGORITHMS)}"'


def in_dpop_scheme(challenge: str, realm: str) -> str:
    """A Bearer challenge (`Bearer realm="<realm>", ...`, RFC 6750 §3) said in the DPoP
    scheme, with the algorithms it takes: a request made with the DPoP scheme is answered
    in it (RFC 9449 §7.1), whatever the refusal (a missing permission, a disallowed
    address, a path no rule covers). Any other challenge is returned as it is."""
    head = f'Bearer realm="{realm}"'
    if not challenge.startswith(head):
        return challenge
    return f"DPoP {ALGS}{challenge[len(head) :]}"


def answered_in_dpop(refused: OAuthError, realm: str) -> None:
    """`refused`'s Bearer challenge said in the DPoP scheme, for a request made with it."""
    challenge = refused.headers.get("WWW-Authenticate")
    if challenge is not None:
        refused.headers = refused.headers | {"WWW-Authenticate": in_dpop_scheme(challenge, realm)}


class _DpopChallenge(OAuthError):
    """At a resource: 401 with a DPoP challenge (RFC 9449 §7.1)."""

    status = 401

    def __init__(self, description: str, *, headers: dict[str, str] | None = None) -> None:
        quoted = rfc6749_text(description)  # in a quoted-string too (RFC 9110 §5.6.4)
        challenge = f'DPoP {ALGS}, error="{self.error}", error_description="{quoted}"'
        super().__init__(description, headers={"WWW-Authenticate": challenge} | (headers or {}))


class DpopProofRefused(_DpopChallenge):
    """A DPoP-bound token whose proof is missing or invalid."""

    error = "invalid_dpop_proof"


class DpopTokenRefused(_DpopChallenge):
    """A DPoP-bound token sent as a Bearer token, or a Bearer token sent as a DPoP one
    (RFC 9449 §7.2: a bound token is never accepted as a Bearer token)."""

    error = "invalid_token"


class DpopNonceRequired(_DpopChallenge):
    """At a resource: 401 use_dpop_nonce with the nonce to use (RFC 9449 §9).
    https://www.rfc-editor.org/rfc/rfc9449#section-9"""

    error = "use_dpop_nonce"

    def __init__(self, description: str, nonce: str) -> None:
        super().__init__(description, headers={NONCE_HEADER: nonce})
        self.nonce = nonce


@dataclass(frozen=True)
class Proof:
    """What a valid proof proves: the key (its RFC 7638 thumbprint) and its single-use id."""

    jkt: str  # RFC 7638, SHA-256, base64url: what a token is bound to (RFC 9449 §6.1)
    jti: str
    iat: int
    #: the server-provided nonce it carries (RFC 9449 §4.2), None without one (or with a
    #: claim that is not a string)
    nonce: str | None = None


def access_token_hash(access_token: str) -> str:
    """`ath` (RFC 9449 §4.2): base64url(SHA-256(the access token's ASCII))."""
    digest = hashlib.sha256(access_token.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


def _percent_normal(match: re.Match[str]) -> str:
    """RFC 3986 §6.2.2.1-2: hex digits in upper case, unreserved characters decoded."""
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def normalised_uri(uri: str) -> str | None:
    """The URI without query and fragment, scheme and host in lower case, the default port
    dropped, percent-encodings normalised, dot segments removed (RFC 9449 §4.3 item 9,
    RFC 3986 §6.2.2 and §6.2.3); None: not an http(s) URI, or one with userinfo (RFC 9110
    §4.2.4: an error; no normalisation removes it). The path stays encoded: `a%20b` is the
    URI a client signs, `a b` is none."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    path = _without_dot_segments(_PERCENT.sub(_percent_normal, parts.path) or "/")
    return urlunsplit((scheme, host, path, "", ""))


def _without_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on an absolute path (after §6.2.2.2, so `%2E` is a dot too): `.`
    dropped, `..` dropping the segment before it, never above the root."""
    segments = path.split("/")
    kept: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    if segments[-1] in (".", ".."):
        kept.append("")  # "/a/." and "/a/b/.." name a directory: "/a/"
    return "/" + "/".join(kept)


def verify(
    proof: str,
    htm: str,
    htu: str,
    now: float,
    *,
    access_token: str | None = None,
    error: type[OAuthError] = InvalidDpopProof,
) -> Proof:
    """RFC 9449 §4.3: one JWT in compact form, typ dpop+jwt, an asymmetric alg, a public jwk
    in its header that verifies its signature, htm and htu naming this request, a recent
    iat, a jti; `ath` naming `access_token` when one is presented with it. Any failure is
    `error` (the token endpoint's 400, or a resource's 401)."""
    if len(proof) > MAX_PROOF or proof.count(".") != 2 or "," in proof:
        raise error("the DPoP proof must be one JWT in compact form")
    header = _header(proof, error)
    if header.get("typ") != PROOF_TYPE:
        raise error(f'the DPoP proof\'s typ must be "{PROOF_TYPE}"')
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise error(f"the DPoP proof's alg must be one of {', '.join(ALGORITHMS)}")
    key_members = header.get("jwk")
    if not isinstance(key_members, dict):
        raise error("the DPoP proof's header needs jwk, the public key")
    if any(member in key_members for member in PRIVATE_MEMBERS):
        raise error("the DPoP proof's jwk must hold no private or symmetric key")
    claims, jkt = _signed(proof, alg, key_members, error)
    _check_claims(claims, htm, htu, now, access_token, error)
    nonce = claims.get("nonce")
    nonce = nonce if isinstance(nonce, str) else None
    return Proof(jkt, claims["jti"], int(claims["iat"]), nonce)


def _header(proof: str, error: type[OAuthError]) -> dict[str, Any]:
    try:
        header: dict[str, Any] = jws.extract_compact(proof.encode(), registry=_REGISTRY).headers()
    except (JoseError, ValueError, UnicodeError, RecursionError):
        raise error("the DPoP proof is not a signed JWT") from None
    return header


def _signed(
    proof: str, alg: str, key_members: dict[str, Any], error: type[OAuthError]
) -> tuple[dict[str, Any], str]:
    if key_members.get("kty") == "RSA":
        n, e = key_members.get("n"), key_members.get("e")
        if not isinstance(n, str) or not isinstance(e, str):
            raise error("the DPoP proof's jwk needs n and e, an RSA public key")
        try:
            problem = rsa_problem(n, e)
        except (binascii.Error, ValueError):
            raise error("the DPoP proof's jwk is not a valid RSA public key") from None
        if problem is not None:  # a weak key binds nothing; a costly one costs every request
            raise error(f"the DPoP proof's jwk: {problem}")
    try:
        key = jwk.import_key(key_members)
        if key.key_type == "oct":
            raise error("the DPoP proof's jwk must hold no private or symmetric key")
        signed = jws.deserialize_compact(proof, key, algorithms=[alg], registry=_REGISTRY)
        jkt = key.thumbprint()
    except (JoseError, ValueError, TypeError, KeyError, RecursionError):
        raise error("the DPoP proof's signature does not verify with its jwk") from None
    claims = jwt_claims(signed.payload)
    if claims is None:
        raise error("the DPoP proof's payload must be a JSON object")
    return claims, jkt


def _check_claims(
    claims: dict[str, Any],
    htm: str,
    htu: str,
    now: float,
    access_token: str | None,
    error: type[OAuthError],
) -> None:
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI:
        raise error(f"the DPoP proof needs a jti of 1 to {MAX_JTI} characters")
    if claims.get("htm") != htm:
        raise error(f"the DPoP proof's htm must be {htm}")
    claimed = claims.get("htu")
    expected = normalised_uri(htu)
    if not isinstance(claimed, str) or expected is None or normalised_uri(claimed) != expected:
        raise error("the DPoP proof's htu must be the URL of this request")
    iat = claims.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int | float):
        raise error("the DPoP proof needs iat, a NumericDate")
    if iat > now + LEEWAY:
        raise error("the DPoP proof's iat is in the future")
    if iat < now - MAX_AGE - LEEWAY:
        raise error("the DPoP proof is too old (its iat)")
    if access_token is not None:
        ath = claims.get("ath")
        if not isinstance(ath, str) or not hmac.compare_digest(
            ath.encode("ascii", "replace"), access_token_hash(access_token).encode()
        ):
            raise error("the DPoP proof's ath must be the hash of the access token")


def binding_error(bound_jkt: str, proof_jkt: str | None, scheme_dpop: bool) -> OAuthError | None:
    """Whether a resource request fits its token's binding (RFC 9449 §7.1, §7.2): a bound
    token needs a valid proof by its key, presented as a DPoP token; an unbound token is
    not a DPoP one. `proof_jkt`: the key of the request's valid proof, None without one."""
    if not bound_jkt:
        if scheme_dpop:
            return DpopTokenRefused("this access token is not DPoP-bound")
        return None
    if not scheme_dpop:
        return DpopTokenRefused("this access token is DPoP-bound: present it with a DPoP proof")
    if proof_jkt is None:
        return DpopProofRefused("a DPoP proof is required for this access token")
    if not hmac.compare_digest(proof_jkt, bound_jkt):
        return DpopProofRefused("the DPoP proof is not signed by the key the token is bound to")
    return None
