"""The DPoP proof rules (RFC 9449 §4.3) and the binding of a token to a key (§7.1), pure."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest
from joserfc import jwk, jws

from service.domain import dpop, grants
from service.domain.state import FamilyState

URL = "https://tollgate.example/oauth/token"
NOW = 1_800_000_000.0


def ec_key():
    return jwk.ECKey.generate_key("P-256")


def proof(key=None, *, alg="ES256", typ="dpop+jwt", header_jwk=None, **claims):
    key = key or ec_key()
    header = {"typ": typ, "alg": alg, "jwk": header_jwk or key.as_dict(private=False)}
    header = {k: v for k, v in header.items() if v is not None}
    body = {"jti": "j-1", "htm": "POST", "htu": URL, "iat": int(NOW)} | claims
    body = {k: v for k, v in body.items() if v is not None}
    return jws.serialize_compact(header, json.dumps(body), key, algorithms=[alg])


def test_a_valid_proof_proves_the_thumbprint_of_its_key():
    key = ec_key()
    verified = dpop.verify(proof(key), "POST", URL, NOW)
    assert verified.jkt == key.thumbprint()
    assert verified.jti == "j-1"


def test_the_htu_is_compared_after_normalisation():
    claimed = "HTTPS://Tollgate.Example:443/oauth/token"
    assert dpop.verify(proof(htu=claimed), "POST", URL, NOW).jti == "j-1"
    # query and fragment are not part of htu
    assert dpop.verify(proof(), "POST", URL + "?a=1#x", NOW).jti == "j-1"


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"htm": "GET"}, "htm"),
        ({"htu": "https://tollgate.example/oauth/other"}, "htu"),
        ({"htu": "https://elsewhere.example/oauth/token"}, "htu"),
        ({"htu": "http://tollgate.example/oauth/token"}, "htu"),
        ({"iat": int(NOW) - 400}, "too old"),
        ({"iat": int(NOW) + 120}, "future"),
        ({"iat": None}, "iat"),
        ({"iat": "now"}, "iat"),
        ({"jti": None}, "jti"),
        ({"jti": "x" * 300}, "jti"),
        # JSON has no NaN, and no lone surrogate; Python's json reads both
        ({"iat": float("nan")}, "JSON object"),
        ({"jti": "\ud800"}, "JSON object"),
        ({"iat": 10**400}, "future"),
    ],
)
def test_a_proof_for_another_request_or_time_is_refused(claims, message):
    with pytest.raises(dpop.InvalidDpopProof, match=message):
        dpop.verify(proof(**claims), "POST", URL, NOW)


def test_a_proof_within_the_clock_skew_is_accepted():
    assert dpop.verify(proof(iat=int(NOW) + 30), "POST", URL, NOW).iat == int(NOW) + 30
    assert dpop.verify(proof(iat=int(NOW) - 300), "POST", URL, NOW).iat == int(NOW) - 300


def test_a_symmetric_or_unsigned_proof_is_refused():
    secret = jwk.OctKey.generate_key(256)
    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": secret.as_dict(private=False)}
    hs = jws.serialize_compact(header, json.dumps({"jti": "a"}), secret, algorithms=["HS256"])
    with pytest.raises(dpop.InvalidDpopProof, match="alg"):
        dpop.verify(hs, "POST", URL, NOW)
    unsigned = _b64({"typ": "dpop+jwt", "alg": "none"}) + "." + _b64({"jti": "a"}) + "."
    with pytest.raises(dpop.InvalidDpopProof, match="alg"):
        dpop.verify(unsigned, "POST", URL, NOW)


def test_a_private_key_in_the_header_is_refused():
    key = ec_key()
    with pytest.raises(dpop.InvalidDpopProof, match="private"):
        dpop.verify(proof(key, header_jwk=key.as_dict(private=True)), "POST", URL, NOW)


def test_a_proof_whose_jwk_did_not_sign_it_is_refused():
    signer, other = ec_key(), ec_key()
    forged = proof(signer, header_jwk=other.as_dict(private=False))
    with pytest.raises(dpop.InvalidDpopProof, match="signature"):
        dpop.verify(forged, "POST", URL, NOW)


@pytest.mark.parametrize("typ", ["JWT", "jwt", None])
def test_a_proof_of_another_type_is_refused(typ):
    with pytest.raises(dpop.InvalidDpopProof, match="typ"):
        dpop.verify(proof(typ=typ), "POST", URL, NOW)


@pytest.mark.parametrize("garbage", ["", "a.b", "a.b.c", "x" * 9000, "a.b.c,d.e.f"])
def test_what_is_not_a_proof_is_refused(garbage):
    with pytest.raises(dpop.InvalidDpopProof):
        dpop.verify(garbage, "POST", URL, NOW)


def test_at_a_resource_ath_must_name_the_access_token():
    token = "tgat_example"
    ath = dpop.access_token_hash(token)
    expected = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=")
    assert ath == expected.decode()
    good = proof(ath=ath)
    kw = {"access_token": token, "error": dpop.DpopProofRefused}
    assert dpop.verify(good, "POST", URL, NOW, **kw).jti == "j-1"
    for bad in (proof(), proof(ath=dpop.access_token_hash("tgat_other"))):
        with pytest.raises(dpop.DpopProofRefused) as refused:
            dpop.verify(bad, "POST", URL, NOW, **kw)
        assert refused.value.status == 401
        assert 'DPoP algs="' in refused.value.headers["WWW-Authenticate"]


def test_the_binding_of_a_token_to_its_key():
    assert dpop.binding_error("", None, scheme_dpop=False) is None
    assert dpop.binding_error("k1", "k1", scheme_dpop=True) is None
    assert isinstance(dpop.binding_error("", None, scheme_dpop=True), dpop.DpopTokenRefused)
    assert isinstance(dpop.binding_error("k1", None, scheme_dpop=False), dpop.DpopTokenRefused)
    assert isinstance(dpop.binding_error("k1", None, scheme_dpop=True), dpop.DpopProofRefused)
    assert isinstance(dpop.binding_error("k1", "k2", scheme_dpop=True), dpop.DpopProofRefused)


def test_a_bound_grant_is_refreshed_only_with_a_proof_by_its_key():
    family = FamilyState("c", "co", refresh_token_hash="r", permissions=frozenset(), jkt="k1")
    from service.domain.state import AppState, ConnectionState

    app = AppState(
        "c", "co", "n", "authorization_code", "https://x", (), (), frozenset(), (), "", 1, (), 3
    )
    connection = ConnectionState(frozenset(), "u")
    now = int(time.time())
    for presented in ("", "k2"):
        with pytest.raises(dpop.InvalidDpopProof):
            grants.refresh(app, "r", ("f", family), connection, None, ("a", "b"), now, "ip",
                           jkt=presented)  # fmt: skip
    issued = grants.refresh(app, "r", ("f", family), connection, None, ("a", "b"), now, "ip",
                            jkt="k1")  # fmt: skip
    assert isinstance(issued, grants.Issue)
    assert issued.record.events[0].dpop_jkt == "k1"


def _b64(data):
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_a_refusal_at_a_resource_is_a_well_formed_challenge():
    with pytest.raises(dpop.DpopProofRefused) as refused:
        dpop.verify(proof(typ="JWT"), "POST", URL, NOW, error=dpop.DpopProofRefused)
    challenge = refused.value.headers["WWW-Authenticate"]
    assert challenge.startswith('DPoP algs="')
    assert challenge.count('"') == 6  # three quoted parameters, nothing quoted inside


@pytest.mark.parametrize(
    ("claimed", "requested", "same"),
    [
        ("https://t.example/a%2fb", "https://t.example/a%2Fb", True),
        ("https://t.example/%7euser", "https://t.example/~user", True),
        ("https://t.example/a%41", "https://t.example/aA", True),
        ("https://t.example/a%20b", "https://t.example/a b", False),
        ("https://t.example/a%2Fb", "https://t.example/a/b", False),  # reserved stays encoded
    ],
)
def test_percent_encodings_are_normalised_not_decoded(claimed, requested, same):
    assert (dpop.normalised_uri(claimed) == dpop.normalised_uri(requested)) is same


@pytest.mark.parametrize(
    ("claimed", "requested"),
    [
        ("https://t.example/oauth/./token", "https://t.example/oauth/token"),
        ("https://t.example/x/../oauth/token", "https://t.example/oauth/token"),
        ("https://t.example/%2E%2E/oauth/token", "https://t.example/oauth/token"),
        ("https://t.example/../oauth/token", "https://t.example/oauth/token"),  # not above /
        ("https://t.example/a/b/c/./../../g", "https://t.example/a/g"),  # RFC 3986 §5.4.1
        ("https://t.example/a/b/..", "https://t.example/a/"),
    ],
)
def test_dot_segments_are_removed(claimed, requested):
    """RFC 9449 §4.3 item 9 asks for RFC 3986 §6.2.2's normalisation, which removes dot
    segments (§6.2.2.3): a proof for /oauth/./token was refused at /oauth/token."""
    assert dpop.normalised_uri(claimed) == dpop.normalised_uri(requested) is not None


def test_an_htu_with_userinfo_is_no_url_of_this_server():
    """No normalisation removes userinfo, and RFC 9110 §4.2.4 calls it an error in an
    http(s) URI: `http://evil@host/oauth/token` was taken for `http://host/oauth/token`."""
    assert dpop.normalised_uri("https://evil@t.example/oauth/token") is None
    assert dpop.normalised_uri("https://a:b@t.example/oauth/token") is None
    with pytest.raises(dpop.DpopProofRefused, match="htu"):
        dpop.verify(
            proof(htu="https://evil@tollgate.example/oauth/token"),
            "POST",
            URL,
            NOW,
            error=dpop.DpopProofRefused,
        )


RSA_2048 = jwk.RSAKey.generate_key(2048)


def _b64_integer(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("members", "message"),
    [
        # a modulus that can be factored binds a token to nothing
        (jwk.RSAKey.generate_key(1024).as_dict(private=False), "at least 2048 bits"),
        # an exponent as long as a private one makes each verification cost as much
        (RSA_2048.as_dict(private=False) | {"e": _b64_integer(2**3071 + 1)}, "public exponent"),
        (RSA_2048.as_dict(private=False) | {"e": _b64_integer(65536)}, "public exponent"),
        (RSA_2048.as_dict(private=False) | {"n": _b64_integer(2**8200 + 1)}, "at most 8192 bits"),
        (RSA_2048.as_dict(private=False) | {"n": "not*base64"}, "not a valid RSA public key"),
        ({"kty": "RSA", "e": "AQAB"}, "needs n and e"),
    ],
)
def test_an_rsa_key_too_weak_or_too_costly_proves_nothing(members, message):
    signed = proof(RSA_2048, alg="RS256", header_jwk=members)
    with pytest.raises(dpop.InvalidDpopProof, match=message):
        dpop.verify(signed, "POST", URL, NOW)


def test_an_rsa_key_of_2048_bits_and_exponent_65537_proves_its_thumbprint():
    assert dpop.verify(proof(RSA_2048, alg="RS256"), "POST", URL, NOW).jkt == RSA_2048.thumbprint()
