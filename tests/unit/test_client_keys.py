"""Client keys and the per-application settings of client authentication: only public
signing keys are registered (RFC 7591 §2 jwks), named by kid or thumbprint (RFC 7638);
a client_credentials application may carry its own token limit."""

from __future__ import annotations

import pytest
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey

from service import events as ev
from service.domain import applications as rules
from service.domain import client_keys, streams
from service.domain.applications import FieldError, NewApplication
from service.errors import InvalidRequest, NotFound

CATALOGUE = {"invoices:read": "read invoices"}
RSA = RSAKey.generate_key(2048)
EC = ECKey.generate_key("P-256")
ED = OKPKey.generate_key("Ed25519")


def public(key, **extra) -> dict:
    return key.as_dict(private=False) | extra


@pytest.mark.parametrize("key", [RSA, EC, ED], ids=["RSA", "EC", "OKP"])
def test_a_public_key_is_registered_by_its_public_members_only(key):
    registered = client_keys.public_key(public(key, kid="k1", alg=None) | {"x5u": "https://x"})
    assert registered.kid == "k1"
    assert registered.thumbprint == key.thumbprint()
    assert set(registered.jwk) <= {"kty", "crv", "x", "y", "n", "e", "kid", "use"}
    assert registered.jwk["use"] == "sig"


def test_a_key_without_a_kid_is_named_by_its_thumbprint():
    registered = client_keys.public_key(public(EC))
    assert registered.kid == registered.thumbprint == EC.thumbprint()


@pytest.mark.parametrize("key", [RSA, EC, ED], ids=["RSA", "EC", "OKP"])
def test_private_key_material_is_refused_clearly(key):
    with pytest.raises(InvalidRequest) as refused:
        client_keys.public_key(key.as_dict(private=True))
    assert "private key material" in str(refused.value)
    assert "'d'" in str(refused.value)


@pytest.mark.parametrize(
    ("jwk", "words"),
    [
        (OctKey.generate_key(256).as_dict(), "private key material"),  # "k": a shared secret
        ({"kty": "oct"}, "kty must be RSA, EC or OKP"),
        ({"kty": ["EC"]}, "kty must be RSA, EC or OKP"),
        ({"kty": "EC", "crv": ["P-256"], "x": "AAAA", "y": "AAAA"}, "needs crv, x, y"),
        (public(EC, use={"a": 1}), 'use must be "sig"'),
        (public(EC, alg=["ES256"]), "is not one of"),
        (public(EC, kid=7), "kid must be"),
        (public(RSAKey.generate_key(1024)), "at least 2048 bits"),
        (public(RSA, e="AQAAAAAB"), "public exponent"),  # 2**32 + 1: each check would cost
        (public(OKPKey.generate_key("X25519")), "crv must be one of"),
        (public(EC, use="enc"), 'use must be "sig"'),
        (public(EC, alg="RS256"), "alg 'RS256' is not one of"),
        (public(EC, alg="HS256"), "alg 'HS256' is not one of"),
        ({"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}, "not a valid public key"),
        ({"kty": "RSA", "n": "AQAB"}, "needs n, e"),
        ("not an object", "JSON object"),
        (public(EC, kid=""), "kid must be"),
    ],
)
def test_what_is_not_a_public_signing_key_is_refused(jwk, words):
    with pytest.raises(InvalidRequest) as refused:
        client_keys.public_key(jwk)
    assert words in str(refused.value)
    assert str(refused.value).startswith("jwks:")


def test_a_jwk_set_needs_keys_and_refuses_the_same_key_or_kid_twice():
    with pytest.raises(InvalidRequest, match="JWK Set"):
        client_keys.jwks([public(EC)])
    with pytest.raises(InvalidRequest, match="already registered"):
        client_keys.jwks({"keys": [public(EC, kid="a"), public(EC, kid="b")]})
    with pytest.raises(InvalidRequest, match="kid 'a' is already registered"):
        client_keys.jwks({"keys": [public(EC, kid="a"), public(RSA, kid="a")]})


def test_adding_and_removing_keys_are_events_with_kid_and_thumbprint():
    [first] = client_keys.jwks({"keys": [public(EC, kid="old")]})
    [added] = client_keys.add("co", "c", (), [first])
    assert isinstance(added, ev.ClientKeyAdded)
    assert (added.kid, added.thumbprint) == ("old", EC.thumbprint())
    assert "d" not in added.jwk
    [second] = client_keys.jwks({"keys": [public(RSA, kid="new")]})
    with pytest.raises(InvalidRequest, match="already registered"):
        client_keys.add("co", "c", [first], [first])
    assert client_keys.add("co", "c", [first], [second])[0].kid == "new"
    removed = client_keys.remove("co", "c", [first, second], "old")
    assert (removed.kid, removed.thumbprint) == ("old", EC.thumbprint())
    with pytest.raises(NotFound):
        client_keys.remove("co", "c", [second], "old")


def new(**fields) -> list[ev.Event]:
    command = NewApplication(
        **{"name": "Sync", "grant_type": "client_credentials", "ip_allowlist": ["192.0.2.1"],
           "permissions": ["invoices:read"], "notification_emails": ["ops@acme.example"]}
        | fields
    )  # fmt: skip
    return rules.create_all(
        command, company_id="co", client_id="c", secret_hash="x" * 64, catalogue=CATALOGUE
    )


def test_an_application_is_created_with_its_method_keys_and_limit_in_one_append():
    events = new(
        token_endpoint_auth_method="private_key_jwt",
        cc_token_limit=5,
        jwks={"keys": [public(EC, kid="k1")]},
    )
    assert [type(e).__name__ for e in events] == [
        "ApplicationCreated",
        "CcTokenLimitChanged",
        "TokenEndpointAuthMethodChanged",
        "ClientKeyAdded",
    ]
    app = rules.fold((e, i, 0.0) for i, e in enumerate(events, 1))
    assert app is not None
    assert app.cc_token_limit == 5
    assert app.token_endpoint_auth_method == "private_key_jwt"
    assert [k.kid for k in app.keys] == ["k1"]
    assert app.version == 4
    # the defaults add nothing to the first shape of the application
    assert [type(e).__name__ for e in new()] == ["ApplicationCreated"]


def test_the_token_limit_is_for_client_credentials_applications_and_bounded():
    with pytest.raises(FieldError, match="client_credentials applications only"):
        new(grant_type="authorization_code", redirect_uri="https://a.example/cb",
            ip_allowlist=[], cc_token_limit=3)  # fmt: skip
    with pytest.raises(FieldError, match="cc_token_limit"):
        new(cc_token_limit=-1)
    with pytest.raises(InvalidRequest, match="token_endpoint_auth_method"):
        new(token_endpoint_auth_method="client_secret_jwt")


def test_a_patch_sets_and_clears_the_token_limit_and_changes_the_method():
    app = rules.fold((e, i, 0.0) for i, e in enumerate(new(), 1))
    assert app is not None
    [limited] = rules.change(app, rules.Patch(cc_token_limit=2), CATALOGUE)
    assert isinstance(limited, ev.CcTokenLimitChanged)
    assert (limited.before, limited.after) == (None, 2)
    app = rules.fold([(e, i, 0.0) for i, e in enumerate(new(), 1)] + [(limited, 2, 0.0)])
    assert app is not None and app.cc_token_limit == 2
    assert rules.change(app, rules.Patch(cc_token_limit=2), CATALOGUE) == []
    [cleared] = rules.change(app, rules.Patch(clear_cc_token_limit=True), CATALOGUE)
    assert (cleared.before, cleared.after) == (2, None)  # type: ignore[attr-defined]
    [method] = rules.change(
        app, rules.Patch(token_endpoint_auth_method="private_key_jwt"), CATALOGUE
    )
    assert isinstance(method, ev.TokenEndpointAuthMethodChanged)
    assert (method.before, method.after) == ("client_secret_basic", "private_key_jwt")


def test_the_assertion_stream_name_is_stable():
    assert streams.client_assertion("ab" * 32) == "client-assertion-" + "ab" * 20
