"""Client authentication with a signed JWT, `private_key_jwt` (RFC 7523 §2.2, §3; RFC 7521
§4.2): the client signs a short-lived assertion with its private key, Tollgate checks it
against the public keys the application registered, and accepts each assertion once.
https://www.rfc-editor.org/rfc/rfc7523#section-3"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from joserfc import jwk, jws
from joserfc.errors import JoseError

from service import events as ev
from service.domain import streams
from service.domain.client_keys import SIGNING_ALGORITHMS, ClientKey, jwt_claims
from service.domain.credentials import digest
from service.domain.grants import Record
from service.domain.state import AppState
from service.eventlog import ConcurrencyError, Metadata
from service.oauth.errors import InvalidClient
from service.oauth.ports import Ledger

#: RFC 7523 §2.2: the value of `client_assertion_type`.
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION = 8192  # characters: an RS512 assertion with a few claims is under 1,000
MAX_JTI = 256
#: Clock skew allowed on exp, iat and nbf (RFC 7523 §3: "a small leeway").
LEEWAY = 60
#: The furthest exp may be from now: an assertion is for one request, not a credential to
#: keep (RFC 7523 §3 item 4 lets the server reject one "too far in the future"). One hour,
#: the default of common client libraries (Authlib signs iat + 3600).
MAX_LIFETIME = 3600
#: A NumericDate past a double's integers is none: refused, not overflowed into float().
LATEST = 2**53


def _registry(*algorithms: str) -> jws.JWSRegistry:
    """joserfc's registry for `algorithms`, with room for a whole assertion in the header:
    its default bound (512 bytes) refused a header carrying the signing certificate (x5c,
    which MSAL sends) or the public key (jwk) of an RSA key, both allowed (RFC 7515
    §4.1.5-6) and passed over here (the keys are the application's registered ones)."""
    registry = jws.JWSRegistry(algorithms=list(algorithms))
    registry.max_header_length = MAX_ASSERTION
    return registry


_ANY_ALGORITHM = _registry(*SIGNING_ALGORITHMS)
_ONE_ALGORITHM = {alg: _registry(alg) for alg in SIGNING_ALGORITHMS}


@dataclass(frozen=True)
class Verified:
    """What an accepted assertion says, for the record of its use."""

    client_id: str
    kid: str
    jti: str
    expires_at: int


#: ASSERTION_AUDIENCE's values: the issuer alone, or also the endpoints' URLs
ISSUER_ONLY = "issuer"
ENDPOINTS_TOO = "issuer-or-endpoint"


def audiences(
    issuer: str, endpoint_path: str = "/oauth/token", accepted: str = ISSUER_ONLY
) -> tuple[str, ...]:
    """What `aud` may be. The issuer, alone (draft-ietf-oauth-rfc7523bis §4, FAPI 2.0
    §5.3.2.1): an assertion whose aud is a token endpoint's URL can have been signed for
    another server that names this one's endpoint as its own, and be replayed here (the
    audience injection of CVE-2025-27370/27371). With ENDPOINTS_TOO, for clients written
    to RFC 7523 §3's older reading, also the token endpoint's URL and that of the
    endpoint the assertion is presented at, at that risk."""
    if accepted != ENDPOINTS_TOO:
        return (issuer,)
    return tuple(dict.fromkeys((issuer, f"{issuer}/oauth/token", f"{issuer}{endpoint_path}")))


def claimed_client(assertion: str) -> str:
    """The client the assertion claims to come from (its `sub`), read before any check,
    only to know whose keys to check it with."""
    if len(assertion) > MAX_ASSERTION or assertion.count(".") != 2:
        raise InvalidClient("client_assertion is not a signed JWT (RFC 7515 compact form)")
    payload = assertion.split(".")[1]
    try:
        claims = jwt_claims(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        claims = None
    if claims is None:
        raise InvalidClient("client_assertion is not a signed JWT (RFC 7515 compact form)")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise InvalidClient("the client assertion needs sub, the client_id (RFC 7523 §3)")
    return sub


def verify(
    app: AppState, assertion: str, accepted_audiences: Sequence[str], now: float
) -> Verified:
    """The assertion's signature against the application's keys, then its claims; any
    failure is invalid_client (RFC 7523 §3.2)."""
    try:
        header = jws.extract_compact(assertion.encode(), registry=_ANY_ALGORITHM).headers()
    except (JoseError, ValueError, UnicodeError, RecursionError):
        raise InvalidClient("client_assertion is not a signed JWT") from None
    alg = header.get("alg")
    if alg not in SIGNING_ALGORITHMS:
        raise InvalidClient(f"the assertion's alg must be one of {', '.join(SIGNING_ALGORITHMS)}")
    kid = header.get("kid")
    candidates = [k for k in app.keys if kid is None or k.kid == kid]
    if not candidates:
        raise InvalidClient("no registered key of this client has the assertion's kid")
    key, claims = _signed_by(assertion, alg, candidates)
    _check_claims(claims, app.client_id, accepted_audiences, now)
    return Verified(app.client_id, key.kid, claims["jti"], int(claims["exp"]))


def _signed_by(
    assertion: str, alg: str, candidates: Iterable[ClientKey]
) -> tuple[ClientKey, dict[str, Any]]:
    for key in candidates:
        if key.jwk.get("alg", alg) != alg:
            continue  # a key registered for one algorithm verifies only that one
        try:
            material: dict[str, str | list[str]] = dict(key.jwk)
            signed = jws.deserialize_compact(
                assertion, jwk.import_key(material), registry=_ONE_ALGORITHM[alg]
            )
        except (JoseError, ValueError, TypeError, RecursionError):
            continue  # another key's signature, or a key of another type
        claims = jwt_claims(signed.payload)
        if claims is None:
            raise InvalidClient("the assertion's payload must be a JSON object (RFC 7519 §7.2)")
        return key, claims
    raise InvalidClient("the assertion's signature does not verify with a registered key")


def _check_claims(
    claims: Mapping[str, Any], client_id: str, accepted_audiences: Sequence[str], now: float
) -> None:
    """RFC 7523 §3: iss and sub are the client_id; aud names this server; exp is there and
    near; iat and nbf are not in the future; jti is there (it is single-use)."""
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        raise InvalidClient("the assertion's iss and sub must both be the client_id")
    aud = claims.get("aud")
    if isinstance(aud, list) and len(aud) == 1:
        aud = aud[0]  # one audience as an array: RFC 7519 §4.1.3 allows either form
    if not isinstance(aud, str) or aud not in accepted_audiences:
        # One value: an assertion meant for several servers is one any of them can replay
        named = " or ".join(accepted_audiences)
        raise InvalidClient(f"the assertion's aud must be one value: {named}")
    exp = _number(claims, "exp", required=True)
    if exp is None or exp <= now - LEEWAY:
        raise InvalidClient("the assertion has expired")
    if exp > now + MAX_LIFETIME + LEEWAY:
        raise InvalidClient(f"the assertion's exp is more than {MAX_LIFETIME} seconds away")
    for name in ("iat", "nbf"):
        at = _number(claims, name, required=False)
        if at is not None and at > now + LEEWAY:
            raise InvalidClient(f"the assertion's {name} is in the future")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI:
        raise InvalidClient(f"the assertion needs a jti of 1 to {MAX_JTI} characters")


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or abs(value) > LATEST:
        raise InvalidClient(f"the assertion's {name} must be a NumericDate (RFC 7519 §2)")
    return float(value)


async def record_use(ledger: Ledger, app: AppState, verified: Verified, meta: Metadata) -> None:
    """Accept the assertion once across every process (RFC 7523 §3 item 7): its use is
    appended at version 0 of a stream named after its jti, so a second use fails the
    append wherever it happens. The log keeps the jti's hash, never the assertion."""
    jti_hash = digest(f"{app.client_id}\n{verified.jti}")
    event = ev.ClientAssertionAccepted(
        company_id=app.company_id,
        client_id=app.client_id,
        jti_hash=jti_hash,
        kid=verified.kid,
        expires_at=verified.expires_at,
    )
    try:
        await ledger.record(Record(streams.client_assertion(jti_hash), 0, (event,)), meta)
    except ConcurrencyError:
        raise InvalidClient("this client assertion has been used already (its jti)") from None
