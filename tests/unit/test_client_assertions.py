"""Client assertions (RFC 7523 §3) checked against an application's keys: what is
accepted, and each way an assertion is refused, all as invalid_client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import msgspec
import pytest
from joserfc import jws, jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey

from service.domain import client_keys
from service.oauth import assertions
from service.oauth.clients import Assertion, Secret, client_credentials
from service.oauth.errors import InvalidClient, InvalidRequest
from tests.unit.rules import NOW, app

ISSUER = "https://auth.example"
AUDIENCES = assertions.audiences(ISSUER)
CLIENT = "client-1"
RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa"})
EC = ECKey.generate_key("P-256", parameters={"kid": "ec"})
ED = OKPKey.generate_key("Ed25519", parameters={"kid": "ed"})


def keyed(*keys):
    registered = tuple(client_keys.public_key(k.as_dict(private=False)) for k in keys)
    state = app()
    return msgspec.structs.replace(state, auth_method="private_key_jwt", keys=registered)


def claims(**changes) -> dict:
    base = {"iss": CLIENT, "sub": CLIENT, "aud": ISSUER, "iat": NOW,
            "exp": NOW + 60, "jti": "j-1"}  # fmt: skip
    return {k: v for k, v in (base | changes).items() if v is not None}


def signed(key, alg="ES256", kid="ec", **changes) -> str:
    header = {"alg": alg} | ({"kid": kid} if kid else {})
    return jwt.encode(header, claims(**changes), key, algorithms=[alg])


def signed_text(key, payload: str, alg="ES256", kid="ec") -> str:
    """A payload as given, signed (a JOSE library's encoder refuses to write some)."""
    return jws.serialize_compact({"alg": alg, "kid": kid}, payload, key, algorithms=[alg])


@pytest.mark.parametrize(
    ("key", "alg"),
    [(RSA, "RS256"), (RSA, "PS256"), (EC, "ES256"), (ED, "EdDSA"), (ED, "Ed25519")],
)
def test_an_assertion_signed_with_a_registered_key_is_accepted(key, alg):
    verified = assertions.verify(keyed(RSA, EC, ED), signed(key, alg, kid=key.kid), AUDIENCES, NOW)
    assert (verified.client_id, verified.kid, verified.jti) == (CLIENT, key.kid, "j-1")
    assert verified.expires_at == NOW + 60


def test_a_header_that_carries_the_certificate_or_the_public_key_is_read():
    """RFC 7515 §4.1.5-6: a header may carry the signing key (jwk) or its certificate
    chain (x5c, which MSAL sends): well over joserfc's default 512 bytes for an RSA key,
    refused as "not a signed JWT". They are passed over: the keys are the registered ones."""
    public = RSA.as_dict(private=False)
    chain = [base64.b64encode(bytes(range(256)) * 4).decode()]  # the size of a certificate
    for extra in ({"jwk": public}, {"x5c": chain}, {"jwk": public, "x5c": chain}):
        header = {"alg": "RS256", "kid": "rsa"} | extra
        assertion = jwt.encode(header, claims(), RSA, algorithms=["RS256"])
        assert len(assertion.split(".")[0]) > 512
        assert assertions.verify(keyed(RSA, EC), assertion, AUDIENCES, NOW).kid == "rsa"


def test_without_a_kid_every_registered_key_is_tried():
    assert assertions.verify(keyed(RSA, EC), signed(EC, kid=None), AUDIENCES, NOW).kid == "ec"


def _part(data: bytes | dict) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _none_alg() -> str:
    return f"{_part({'alg': 'none'})}.{_part(claims())}."


def _hs256_with_public_key() -> str:
    """The classic confusion attack: the public key (as registered, and as PEM) used as an
    HMAC secret. Built by hand: JOSE libraries refuse to make it."""
    signing_input = f"{_part({'alg': 'HS256', 'kid': 'ec'})}.{_part(claims())}"
    secret = EC.as_pem(private=False)
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_part(mac)}"


@pytest.mark.parametrize(
    ("assertion", "words"),
    [
        (lambda: signed(EC, aud="https://elsewhere/oauth/token"), "aud"),
        (lambda: signed(EC, aud=None), "aud"),
        (lambda: signed(EC, exp=NOW - 61, iat=NOW - 120), "expired"),
        (lambda: signed(EC, exp=None), "exp"),
        (lambda: signed(EC, exp=NOW + 3600 + 61), "more than 3600 seconds"),
        (lambda: signed(EC, iat=NOW + 61), "iat is in the future"),
        (lambda: signed(EC, nbf=NOW + 61), "nbf is in the future"),
        (lambda: signed(EC, iat="yesterday"), "NumericDate"),
        (lambda: signed(EC, exp=10**400), "NumericDate"),
        (lambda: signed(EC, nbf=10**400), "NumericDate"),
        # JSON has no NaN, and no lone surrogate; Python's json reads both
        (lambda: signed(EC, exp=float("nan")), "JSON object"),
        (lambda: signed(EC, iat=float("nan")), "JSON object"),
        (lambda: signed_text(EC, json.dumps(claims(jti="\ud800"))), "JSON object"),
        (lambda: signed(EC, jti=None), "jti"),
        (lambda: signed(EC, iss="someone-else"), "iss and sub"),
        (lambda: signed(ECKey.generate_key("P-256")), "signature"),
        (lambda: signed(EC, kid="unknown"), "kid"),
        (lambda: signed(RSA, alg="RS256", kid="ec"), "signature"),  # a key of another type
        (_none_alg, "alg"),
        (_hs256_with_public_key, "alg"),
        (lambda: "not.a.jwt", "JWT"),
    ],
)
def test_a_bad_assertion_is_invalid_client(assertion, words):
    with pytest.raises(InvalidClient) as refused:
        assertions.verify(keyed(EC, RSA), assertion(), AUDIENCES, NOW)
    assert words in refused.value.description
    assert refused.value.status == 401


@pytest.mark.parametrize(
    "aud",
    [
        # a token endpoint's URL: another server can name this one's as its own, and
        # replay what its clients sign for it (audience injection, CVE-2025-27370)
        f"{ISSUER}/oauth/token",
        # several audiences: an assertion any of them can replay here
        [ISSUER, "https://elsewhere.example"],
        ["https://elsewhere.example/oauth/token", ISSUER],
        [ISSUER, ISSUER],
        [],
        f"{ISSUER}/",
    ],
)
def test_the_issuer_alone_is_the_audience(aud):
    with pytest.raises(InvalidClient, match=f"aud must be one value: {ISSUER}"):
        assertions.verify(keyed(EC), signed(EC, aud=aud), AUDIENCES, NOW)


def test_the_issuer_may_come_as_an_array_of_one():
    assert assertions.verify(keyed(EC), signed(EC, aud=[ISSUER]), AUDIENCES, NOW).jti == "j-1"


def test_endpoints_are_audiences_only_when_configured_and_then_alone():
    older = assertions.audiences(ISSUER, "/oauth/revoke", assertions.ENDPOINTS_TOO)
    assert older == (ISSUER, f"{ISSUER}/oauth/token", f"{ISSUER}/oauth/revoke")
    for aud in older:
        assert assertions.verify(keyed(EC), signed(EC, aud=aud), older, NOW).jti == "j-1"
    with pytest.raises(InvalidClient, match=r"must be one value: .* or "):
        assertions.verify(keyed(EC), signed(EC, aud=[ISSUER, f"{ISSUER}/oauth/token"]), older, NOW)
    assert assertions.audiences(ISSUER, "/oauth/revoke") == (ISSUER,)


def test_a_small_clock_skew_is_allowed():
    state = keyed(EC)
    assertions.verify(state, signed(EC, iat=NOW + 30, nbf=NOW + 30), AUDIENCES, NOW)
    assertions.verify(state, signed(EC, exp=NOW - 30), AUDIENCES, NOW)


def test_a_key_registered_for_one_algorithm_verifies_no_other():
    registered = client_keys.public_key(RSA.as_dict(private=False) | {"alg": "PS256"})
    state = msgspec.structs.replace(app(), auth_method="private_key_jwt", keys=(registered,))
    assertions.verify(state, signed(RSA, "PS256", kid="rsa"), AUDIENCES, NOW)
    with pytest.raises(InvalidClient, match="signature"):
        assertions.verify(state, signed(RSA, "RS256", kid="rsa"), AUDIENCES, NOW)


def test_the_request_carries_an_assertion_or_a_secret_never_both():
    assertion = signed(EC)
    found = client_credentials(
        None, {"client_assertion_type": assertions.ASSERTION_TYPE, "client_assertion": assertion}
    )
    assert found == Assertion(CLIENT, assertion)
    assert client_credentials(None, {"client_id": "c", "client_secret": "s"}) == Secret("c", "s")
    both = {
        "client_assertion_type": assertions.ASSERTION_TYPE,
        "client_assertion": assertion,
        "client_secret": "s",
    }
    with pytest.raises(InvalidRequest, match="one client authentication method"):
        client_credentials(None, both)
    with pytest.raises(InvalidClient, match="client_assertion_type"):
        client_credentials(None, {"client_assertion_type": "saml", "client_assertion": assertion})
    with pytest.raises(InvalidClient, match="not the client"):
        client_credentials(
            None,
            {
                "client_assertion_type": assertions.ASSERTION_TYPE,
                "client_assertion": assertion,
                "client_id": "another",
            },
        )


@pytest.mark.parametrize(
    "payload",
    [b'{"sub": "client-1", "exp": NaN}', b'{"sub": "\\ud800"}', b'["client-1"]', b"client-1"],
)
def test_the_claimed_client_is_read_from_json_alone(payload):
    """The assertion's `sub`, read before any check to find the client's keys: a payload
    Python's json reads and JSON does not (NaN, a lone surrogate) is no JWT either."""
    assertion = f"{_part({'alg': 'ES256'})}.{_part(payload)}.c2ln"
    with pytest.raises(InvalidClient, match="not a signed JWT"):
        assertions.claimed_client(assertion)
    good = f"{_part({'alg': 'ES256'})}.{_part({'sub': CLIENT})}.c2ln"
    assert assertions.claimed_client(good) == CLIENT
