"""`private_key_jwt` client authentication over HTTP (RFC 7523 §2.2, RFC 7521 §4.2): keys
registered as public JWKs through the admin API, assertions checked at the token,
revocation and introspection endpoints, each accepted once in every process, rotation
without downtime, and no key material or assertion in the log, the database or a log
line."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time
import uuid

import pytest
import structlog
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from service.app import CONTEXT
from service.oauth.assertions import ASSERTION_TYPE
from tests.e2e.oauth_helpers import REDIRECT, basic, code_for, new_app
from tests.e2e.test_admin_people import caught_up

RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
EC = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
EC2 = ECKey.generate_key("P-256", parameters={"kid": "ec-2"})


def jwks(*keys) -> dict:
    return {"keys": [k.as_dict(private=False) for k in keys]}


def issuer(client) -> str:
    return client.app[CONTEXT].settings.issuer


async def keyed_app(client, company, *keys, **fields) -> dict:
    return await new_app(
        client,
        company,
        token_endpoint_auth_method="private_key_jwt",
        jwks=jwks(*(keys or (EC,))),
        **fields,
    )


def assertion(client, app, key=EC, alg="ES256", kid=None, **changes) -> str:
    now = int(time.time())
    claims = {
        "iss": app["client_id"],
        "sub": app["client_id"],
        "aud": issuer(client),
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
    } | changes
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode({"alg": alg, "kid": kid or key.kid}, claims, key, algorithms=[alg])


def assertion_params(value: str, **extra) -> dict:
    return {"client_assertion_type": ASSERTION_TYPE, "client_assertion": value, **extra}


async def token_request(client, value: str):
    return await client.post(
        "/oauth/token", data={"grant_type": "client_credentials", **assertion_params(value)}
    )


async def issued(db) -> int:
    return await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'AccessTokenIssued'")


# --- the happy path, with a third-party client ---------------------------------------


async def authlib_token(client, app, aud: str) -> dict:
    """A client_credentials token fetched by Authlib, whose PrivateKeyJWT signs the URL it
    is given as the assertion's aud."""
    base = str(client.make_url("")).rstrip("/")
    async with AsyncOAuth2Client(
        app["client_id"], RSA, token_endpoint_auth_method="private_key_jwt"
    ) as oauth:
        oauth.register_client_auth_method(PrivateKeyJWT(aud))
        return dict(await oauth.fetch_token(f"{base}/oauth/token", grant_type="client_credentials"))


async def test_authlib_gets_a_client_credentials_token_with_private_key_jwt(client, company, db):
    app = await keyed_app(client, company, RSA)
    assert "client_secret" not in app  # no secret to keep for a key-bound client
    assert app["token_endpoint_auth_method"] == "private_key_jwt"
    assert app["jwks"]["keys"][0]["kid"] == "rsa-1"
    assert "d" not in app["jwks"]["keys"][0]
    token = await authlib_token(client, app, issuer(client))  # the issuer, as Tollgate asks
    again = await authlib_token(client, app, issuer(client))
    assert token["token_type"] == "Bearer"
    assert again["access_token"] != token["access_token"]
    whoami = await client.get(
        "/api/v1/whoami", headers={"Authorization": f"Bearer {token['access_token']}"}
    )
    assert whoami.status == 200
    accepted = await db.pool.fetch(
        "SELECT stream_id, payload FROM events WHERE type = 'ClientAssertionAccepted'"
    )
    assert len(accepted) == 2
    payload = json.loads(accepted[0]["payload"])
    assert payload["client_id"] == app["client_id"]
    assert payload["kid"] == "rsa-1"
    assert accepted[0]["stream_id"].startswith("client-assertion-")


async def test_an_assertion_signed_for_the_token_endpoint_is_refused_by_default(client, company):
    """The endpoint's URL as aud is what another server that names this one's token
    endpoint as its own can have its clients sign, and replay here (audience injection):
    the issuer alone is the audience unless ASSERTION_AUDIENCE says otherwise."""
    app = await keyed_app(client, company, RSA)
    with pytest.raises(OAuthError) as refused:
        await authlib_token(client, app, f"{issuer(client)}/oauth/token")
    assert refused.value.error == "invalid_client"
    assert refused.value.description == f"the assertion's aud must be one value: {issuer(client)}"


class TestEndpointsAsAudiences:
    """ASSERTION_AUDIENCE=issuer-or-endpoint: clients written to RFC 7523's older reading,
    which sign the token endpoint's URL (Authlib's default) or the URL they call."""

    @pytest.fixture
    def settings(self, settings):
        return dataclasses.replace(settings, assertion_audience="issuer-or-endpoint")

    async def test_the_endpoints_urls_are_accepted_each_alone(self, client, company):
        app = await keyed_app(client, company, RSA)
        token = await authlib_token(client, app, f"{issuer(client)}/oauth/token")
        introspect = f"{issuer(client)}/oauth/introspect"
        looked = await client.post(
            "/oauth/introspect",
            data={
                "token": token["access_token"],
                **assertion_params(assertion(client, app, RSA, "RS256", aud=introspect)),
            },
        )
        assert (await looked.json()).get("active") is True, await looked.text()
        both = assertion(client, app, RSA, "RS256", aud=[issuer(client), introspect])
        refused = await client.post(
            "/oauth/introspect", data={"token": token["access_token"], **assertion_params(both)}
        )
        said = (await refused.json())["error_description"]
        assert said.startswith("the assertion's aud must be one value: ") and introspect in said


async def test_revocation_and_introspection_authenticate_with_an_assertion(client, company):
    app = await keyed_app(client, company)
    token = (await (await token_request(client, assertion(client, app))).json())["access_token"]
    looked = await client.post(
        "/oauth/introspect", data={"token": token, **assertion_params(assertion(client, app))}
    )
    assert looked.status == 200
    assert (await looked.json())["active"] is True
    revoked = await client.post(
        "/oauth/revoke", data={"token": token, **assertion_params(assertion(client, app))}
    )
    assert revoked.status == 200
    replayed = assertion(client, app)
    first = await client.post(
        "/oauth/introspect", data={"token": token, **assertion_params(replayed)}
    )
    assert (await first.json()) == {"active": False}
    second = await client.post(
        "/oauth/introspect", data={"token": token, **assertion_params(replayed)}
    )
    assert second.status == 400
    assert (await second.json())["error"] == "invalid_client"


# --- single use ----------------------------------------------------------------------


async def test_a_replayed_assertion_is_refused(client, company, db):
    app = await keyed_app(client, company)
    value = assertion(client, app)
    assert (await token_request(client, value)).status == 200
    replay = await token_request(client, value)
    assert replay.status == 400
    body = await replay.json()
    assert body["error"] == "invalid_client"
    assert "used already" in body["error_description"]
    # the assertion came in the body: no Basic challenge (RFC 6749 §5.2), which a strict
    # client would read as the answer instead of the error
    assert "WWW-Authenticate" not in replay.headers
    assert await issued(db) == 1


async def test_a_refused_token_request_records_nothing_of_its_assertion(client, company, db):
    """Its single use is recorded with the grant: a scope too wide records nothing, and
    the assertion is not spent by it."""
    app = await keyed_app(client, company)
    value = assertion(client, app)
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    too_wide = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "scope": "payments:admin",
              **assertion_params(value)},
    )  # fmt: skip
    assert too_wide.status == 400 and (await too_wide.json())["error"] == "invalid_scope"
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before
    assert (await token_request(client, value)).status == 200
    replay = await token_request(client, value)
    assert replay.status == 400 and "used already" in (await replay.json())["error_description"]
    accepted = "SELECT count(*) FROM events WHERE type = 'ClientAssertionAccepted'"
    assert await db.pool.fetchval(accepted) == 1


async def test_a_replayed_code_exchange_stops_at_its_assertion_and_revokes_nothing(
    client, company, db
):
    """The whole request replayed (a proxy's log, an eavesdropper): its assertion is spent,
    and that stops it before the code's reuse detection, which would revoke the grant the
    client just got. The spend came after that detection for a while: the replay revoked
    the client's tokens."""
    app = await keyed_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    code = await code_for(client, company, app)
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
            **assertion_params(assertion(client, app))}  # fmt: skip
    granted = await client.post("/oauth/token", data=form)
    assert granted.status == 200, await granted.text()
    tokens = await granted.json()
    replay = await client.post("/oauth/token", data=form)
    assert replay.status == 400
    assert (await replay.json())["error"] == "invalid_client"
    reused = "SELECT count(*) FROM events WHERE type IN ('AuthorizationCodeReused', 'TokenRevoked')"
    assert await db.pool.fetchval(reused) == 0
    whoami = await client.get(
        "/api/v1/whoami", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert whoami.status == 200
    # presented again with an assertion of its own, the code's reuse is what it always was
    again = form | assertion_params(assertion(client, app))
    reuse = await client.post("/oauth/token", data=again)
    assert reuse.status == 400 and (await reuse.json())["error"] == "invalid_grant"
    assert await db.pool.fetchval(reused) > 0


async def test_an_assertion_is_accepted_once_across_two_processes(client, company, db, settings):
    """The same assertion sent to two service processes on one database, at once and one
    after the other: one token, whichever process answers first."""
    from aiohttp.test_utils import TestClient, TestServer

    from service.app import create_app
    from service.storage.database import Database

    app = await keyed_app(client, company)
    other = TestClient(
        TestServer(create_app(settings, database=Database(db.dsn, db.pool)), host="127.0.0.1")
    )
    await other.start_server()
    try:
        for _ in range(5):
            value = assertion(client, app)
            answers = await asyncio.gather(
                token_request(client, value),
                token_request(other, value),
                token_request(other, value),
            )
            assert sorted(a.status for a in answers) == [200, 400, 400]
        value = assertion(client, app)
        assert (await token_request(other, value)).status == 200
        assert (await token_request(client, value)).status == 400
    finally:
        await other.close()
    assert await issued(db) == 6


# --- what is refused -----------------------------------------------------------------


def _none_alg(client, app) -> str:
    _, payload, _ = assertion(client, app).split(".")
    none = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    return f"{none}.{payload}."


def _hs256_with_public_key(client, app) -> str:
    value = assertion(client, app)
    _, payload, _ = value.split(".")
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","kid":"ec-1"}').rstrip(b"=").decode()
    signing_input = f"{header}.{payload}".encode()
    secret = json.dumps(EC.as_dict(private=False)).encode()
    mac = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda c, a: assertion(c, a, aud="https://elsewhere/token"), id="wrong-aud"),
        pytest.param(
            lambda c, a: assertion(c, a, iat=int(time.time()) - 600, exp=int(time.time()) - 300),
            id="expired",
        ),
        pytest.param(lambda c, a: assertion(c, a, iat=int(time.time()) + 600), id="future-iat"),
        pytest.param(lambda c, a: assertion(c, a, exp=int(time.time()) + 86400), id="far-exp"),
        pytest.param(lambda c, a: assertion(c, a, exp=None), id="no-exp"),
        pytest.param(lambda c, a: assertion(c, a, jti=None), id="no-jti"),
        pytest.param(lambda c, a: assertion(c, a, key=EC2, kid="ec-1"), id="wrong-key"),
        pytest.param(lambda c, a: assertion(c, a, key=EC2), id="unknown-kid"),
        pytest.param(lambda c, a: assertion(c, a, iss="someone"), id="iss-not-client"),
        pytest.param(_none_alg, id="alg-none"),
        pytest.param(_hs256_with_public_key, id="hs256-public-key"),
        pytest.param(lambda c, a: "a.b.c", id="garbage"),
    ],
)
async def test_a_bad_assertion_is_400_invalid_client(client, company, db, make):
    app = await keyed_app(client, company)
    response = await token_request(client, make(client, app))
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "invalid_client", body
    assert response.headers["Cache-Control"] == "no-store"
    assert await issued(db) == 0
    assert (
        await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'ClientAssertionAccepted'")
        == 0
    )


async def test_an_assertion_with_a_secret_beside_it_is_refused(client, company):
    app = await keyed_app(client, company)
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", **assertion_params(assertion(client, app))},
        headers=basic(app["client_id"], "whatever"),
    )
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"


async def test_a_key_bound_client_refuses_a_secret_and_a_secret_client_an_assertion(
    client, company
):
    keyed = await keyed_app(client, company)
    rotated = await client.post(
        f"/admin/applications/{keyed['client_id']}/rotate-secret", headers=company.auth
    )
    secret = (await rotated.json())["client_secret"]
    refused = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=basic(keyed["client_id"], secret),
    )
    assert refused.status == 401
    assert "private_key_jwt" in (await refused.json())["error_description"]

    with_secret = await new_app(client, company)
    added = await client.post(
        f"/admin/applications/{with_secret['client_id']}/keys", json=jwks(EC), headers=company.auth
    )
    assert added.status == 201
    refused = await token_request(client, assertion(client, with_secret))
    assert refused.status == 400
    assert "client secret" in (await refused.json())["error_description"]
    # switching the method switches what is accepted
    switched = await client.patch(
        f"/admin/applications/{with_secret['client_id']}",
        json={"token_endpoint_auth_method": "private_key_jwt"},
        headers=company.auth,
    )
    assert (await switched.json())["token_endpoint_auth_method"] == "private_key_jwt"
    assert (await token_request(client, assertion(client, with_secret))).status == 200


async def test_the_allow_list_holds_for_assertions_as_for_secrets(client, company, db):
    app = await keyed_app(client, company, ip_allowlist=["192.0.2.0/24"])
    response = await token_request(client, assertion(client, app))
    assert response.status == 403
    assert (await response.json())["error"] == "ip_not_allowed"
    [violation] = await db.pool.fetch(
        "SELECT payload FROM events WHERE type = 'IpViolationDetected'"
    )
    payload = json.loads(violation["payload"])
    assert (payload["client_id"], payload["endpoint"]) == (app["client_id"], "token")
    assert await issued(db) == 0


# --- keys through the admin API, and rotation ----------------------------------------


async def test_key_rotation_add_new_use_new_remove_old_old_refused(client, company, db):
    app = await keyed_app(client, company, EC)
    keys_url = f"/admin/applications/{app['client_id']}/keys"
    assert (await token_request(client, assertion(client, app, key=EC))).status == 200
    added = await client.post(keys_url, json=jwks(RSA), headers=company.auth)
    assert added.status == 201
    listed = await (await client.get(keys_url, headers=company.auth)).json()
    assert [k["kid"] for k in listed["keys"]] == ["ec-1", "rsa-1"]
    assert listed["keys"][1]["thumbprint"] == RSA.thumbprint()
    assert all("d" not in k["jwk"] for k in listed["keys"])
    # both keys work while the clients move over
    assert (await token_request(client, assertion(client, app, key=RSA, alg="RS256"))).status == 200
    assert (await token_request(client, assertion(client, app, key=EC))).status == 200
    removed = await client.delete(f"{keys_url}/ec-1", headers=company.auth)
    assert removed.status == 204
    old = await token_request(client, assertion(client, app, key=EC))
    assert old.status == 400
    assert (await old.json())["error"] == "invalid_client"
    assert (await token_request(client, assertion(client, app, key=RSA, alg="RS256"))).status == 200
    types = [
        r["type"]
        for r in await db.pool.fetch(
            "SELECT type FROM events WHERE type LIKE 'ClientKey%' ORDER BY position"
        )
    ]
    assert types == ["ClientKeyAdded", "ClientKeyAdded", "ClientKeyRemoved"]
    await caught_up(client)  # the applications table is a projection: it follows the log
    column = await db.pool.fetchval(
        "SELECT client_key_ids FROM applications WHERE client_id = $1", app["client_id"]
    )
    assert column == ["rsa-1"]


async def test_an_empty_jwk_set_changes_nothing(client, company, db):
    """No key to register: nothing to record. It was a 500 (an append of no events)."""
    app = await keyed_app(client, company, EC)
    keys_url = f"/admin/applications/{app['client_id']}/keys"
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    empty = await client.post(keys_url, json={"keys": []}, headers=company.auth)
    assert empty.status < 500, await empty.text()
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before


async def test_private_key_material_is_refused_with_a_clear_400(client, company, db):
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    body = {
        "name": "Signer",
        "grant_type": "client_credentials",
        "ip_allowlist": ["127.0.0.1"],
        "permissions": ["invoices:read"],
        "notification_emails": ["ops@acme.example"],
        "token_endpoint_auth_method": "private_key_jwt",
        "jwks": {"keys": [RSA.as_dict(private=True)]},
    }
    response = await client.post("/admin/applications", json=body, headers=company.auth)
    assert response.status == 400
    description = (await response.json())["error_description"]
    assert "private key material" in description
    assert RSA.as_dict(private=True)["d"] not in description
    app = await keyed_app(client, company)
    keys_url = f"/admin/applications/{app['client_id']}/keys"
    added = await client.post(
        keys_url, json={"keys": [EC2.as_dict(private=True)]}, headers=company.auth
    )
    assert added.status == 400
    assert "private key material" in (await added.json())["error_description"]
    # the application, its method and its key: nothing of the refused requests
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before + 3


async def test_keys_of_another_company_or_unknown_kids_are_404(client, company, other_company):
    app = await keyed_app(client, company)
    keys_url = f"/admin/applications/{app['client_id']}/keys"
    assert (await client.get(keys_url, headers=other_company.auth)).status == 404
    posted = await client.post(keys_url, json=jwks(EC2), headers=other_company.auth)
    assert posted.status == 404
    assert (await client.delete(f"{keys_url}/ec-1", headers=other_company.auth)).status == 404
    assert (await client.delete(f"{keys_url}/nope", headers=company.auth)).status == 404
    again = await client.post(keys_url, json=jwks(EC), headers=company.auth)
    assert again.status == 400
    assert "already registered" in (await again.json())["error_description"]


async def test_the_metadata_lists_private_key_jwt_and_its_algorithms(client):
    document = await (await client.get("/.well-known/oauth-authorization-server")).json()
    assert "private_key_jwt" in document["token_endpoint_auth_methods_supported"]
    assert "client_secret_basic" in document["token_endpoint_auth_methods_supported"]
    algs = document["token_endpoint_auth_signing_alg_values_supported"]
    assert {"RS256", "PS256", "ES256", "EdDSA"} <= set(algs)
    assert "none" not in algs and "HS256" not in algs


# --- nothing secret kept -------------------------------------------------------------


async def test_no_key_material_or_assertion_in_the_log_the_database_or_log_lines(
    client, company, db
):
    app = await keyed_app(client, company, EC, RSA)
    sent = []
    with structlog.testing.capture_logs() as lines:
        for make in (
            lambda: assertion(client, app),
            lambda: assertion(client, app, key=EC2, kid="ec-1"),  # refused: wrong key
            lambda: assertion(client, app, aud="https://elsewhere"),  # refused: audience
        ):
            value = make()
            sent.append(value)
            await token_request(client, value)
        await token_request(client, sent[0])  # a replay
    private = [EC.as_dict(private=True)["d"], RSA.as_dict(private=True)["d"]]
    secret_bits = [*private, *sent, *(s.split(".")[2] for s in sent)]
    logged = json.dumps(lines, default=str)
    assert "security.client_assertion_refused" in logged
    dumped = []
    for table in ("events", "applications", "live_tokens"):
        dumped.append(str([tuple(r) for r in await db.pool.fetch(f"SELECT * FROM {table}")]))
    everything = logged + "".join(dumped)
    for bit in secret_bits:
        assert bit not in everything
    jti = json.loads(base64.urlsafe_b64decode(sent[0].split(".")[1] + "=="))["jti"]
    assert jti not in everything  # kept as a hash only


@pytest.mark.parametrize(
    "body",
    [
        {"keys": "not a list"},
        {"keys": [1]},
        {"keys": [{"kty": ["EC"]}]},
        {"keys": [{"kty": "EC", "crv": "P-256", "x": 1, "y": None}]},
        {"keys": [{"kty": "RSA", "n": "!!!", "e": "AQAB"}]},
        {"nokeys": []},
        [],
    ],
)
async def test_a_malformed_jwk_set_is_a_400_never_a_500(client, company, body):
    app = await keyed_app(client, company)
    response = await client.post(
        f"/admin/applications/{app['client_id']}/keys", json=body, headers=company.auth
    )
    assert response.status == 400, await response.text()
    assert (await response.json())["error"] == "invalid_request"


async def test_a_key_whose_kid_has_a_slash_is_removed_through_the_api(client, company, db):
    """aiohttp's `{kid}` stops at "/": a kid such as "team/ec-1" must be removable, sent
    as it is or percent-encoded."""
    from yarl import URL

    plain = ECKey.generate_key("P-256", parameters={"kid": "team/ec-1"})
    encoded = ECKey.generate_key("P-256", parameters={"kid": "team/ec/2"})
    app = await keyed_app(client, company, plain, encoded, EC)
    keys_url = f"/admin/applications/{app['client_id']}/keys"
    assert (await token_request(client, assertion(client, app, key=plain))).status == 200

    removed = await client.delete(f"{keys_url}/team/ec-1", headers=company.auth)
    assert removed.status == 204, await removed.text()
    removed = await client.delete(
        URL(f"{keys_url}/team%2Fec%2F2", encoded=True), headers=company.auth
    )
    assert removed.status == 204, await removed.text()
    gone = await client.delete(f"{keys_url}/team/ec-1", headers=company.auth)
    assert gone.status == 404

    listed = await (await client.get(keys_url, headers=company.auth)).json()
    assert [k["kid"] for k in listed["keys"]] == ["ec-1"]
    refused = await token_request(client, assertion(client, app, key=plain))
    assert refused.status == 400
    assert (await refused.json())["error"] == "invalid_client"
    removals = await db.pool.fetch(
        "SELECT payload FROM events WHERE type = 'ClientKeyRemoved' ORDER BY position"
    )
    assert [json.loads(r["payload"])["kid"] for r in removals] == ["team/ec-1", "team/ec/2"]
