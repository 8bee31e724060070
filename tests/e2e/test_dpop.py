"""DPoP (RFC 9449) over HTTP: tokens bound to the key of the client's proof at the token
endpoint (every grant, refresh keeping the binding), proofs checked at /policy/check and
the gateway, each proof accepted once in every process, applications that require DPoP,
introspection's `cnf`, and no proof or token in the log, the database or a log line."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid

import pytest
import structlog
from joserfc import jws
from joserfc.jwk import ECKey, OctKey, RSAKey

from service.app import CONTEXT
from service.commands.directory import register_resource_server
from service.eventlog import Metadata
from tests.e2e.oauth_helpers import basic, code_for, new_app, pkce
from tests.e2e.test_admin_people import caught_up

KEY = ECKey.generate_key("P-256")
OTHER = ECKey.generate_key("P-256")
RSA = RSAKey.generate_key(2048)


def issuer(client) -> str:
    return client.app[CONTEXT].settings.issuer


def ath(token: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()


def proof(
    client,
    key=KEY,
    *,
    htm="POST",
    path="/oauth/token",
    alg="ES256",
    header_jwk=None,
    token=None,
    **claims,
) -> str:
    """A DPoP proof as a client library writes one (RFC 9449 §4.2)."""
    body = {
        "jti": uuid.uuid4().hex,
        "htm": htm,
        "htu": f"{issuer(client)}{path}",
        "iat": int(time.time()),
    }
    if token is not None:
        body["ath"] = ath(token)
    body = {k: v for k, v in (body | claims).items() if v is not None}
    jwk = header_jwk if header_jwk is not None else key.as_dict(private=False)
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": jwk}
    return jws.serialize_compact(header, json.dumps(body), key, algorithms=[alg])


async def cc_request(client, app, dpop: str | None = None, **extra):
    headers = basic(app["client_id"], app["client_secret"])
    if dpop is not None:
        headers["DPoP"] = dpop
    return await client.post(
        "/oauth/token", data={"grant_type": "client_credentials", **extra}, headers=headers
    )


async def bound_cc_token(client, app, key=KEY) -> str:
    response = await cc_request(client, app, proof(client, key))
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["token_type"] == "DPoP"
    return body["access_token"]


async def whoami(client, token: str, dpop: str | None = None, scheme: str = "DPoP"):
    headers = {"Authorization": f"{scheme} {token}"}
    if dpop is not None:
        headers["DPoP"] = dpop
    return await client.get("/api/v1/whoami", headers=headers)


async def rs_headers(client) -> dict[str, str]:
    _, key = await register_resource_server(client.app[CONTEXT], "billing api", Metadata())
    return {"Authorization": f"Bearer {key}"}


async def accepted(db) -> int:
    return await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'DpopProofAccepted'")


# --- the token endpoint --------------------------------------------------------------


async def test_a_client_credentials_token_is_bound_to_the_proofs_key(client, company, db):
    app = await new_app(client, company)
    token = await bound_cc_token(client, app)
    [payload] = await db.pool.fetch("SELECT payload FROM events WHERE type = 'AccessTokenIssued'")
    assert json.loads(payload["payload"])["dpop_jkt"] == KEY.thumbprint()
    assert await accepted(db) == 1
    # used with a proof by its key, at the gateway
    answer = await whoami(
        client, token, proof(client, htm="GET", path="/api/v1/whoami", token=token)
    )
    assert answer.status == 200, await answer.text()
    # a request without a proof gets a Bearer token, as before
    plain = await (await cc_request(client, app)).json()
    assert plain["token_type"] == "Bearer"
    issued = await db.pool.fetch(
        "SELECT payload FROM events WHERE type = 'AccessTokenIssued' ORDER BY position"
    )
    assert json.loads(issued[1]["payload"])["dpop_jkt"] == ""


async def refresh(client, app, refresh_token, dpop=None):
    headers = basic(app["client_id"], app["client_secret"])
    if dpop is not None:
        headers["DPoP"] = dpop
    return await client.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        headers=headers,
    )


async def test_a_public_clients_grant_redeemed_with_a_proof_stays_bound(client, company, db):
    from tests.e2e.test_native_apps import code_at, public_app

    app = await public_app(client, company)
    verifier, challenge = pkce()
    code = await code_at(client, company, app, app["redirect_uri"], challenge)
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "authorization_code", "code": code, "client_id": app["client_id"],
              "redirect_uri": app["redirect_uri"], "code_verifier": verifier},
        headers={"DPoP": proof(client)},
    )  # fmt: skip
    assert response.status == 200, await response.text()
    first = await response.json()
    assert first["token_type"] == "DPoP"
    [issued] = await db.pool.fetch("SELECT payload FROM events WHERE type = 'AccessTokenIssued'")
    assert json.loads(issued["payload"])["binds_grant"] is True

    async def refresh_with(refresh_token: str, dpop: str | None = None):
        return await client.post(
            "/oauth/token",
            data={"grant_type": "refresh_token", "refresh_token": refresh_token,
                  "client_id": app["client_id"]},
            headers={} if dpop is None else {"DPoP": dpop},
        )  # fmt: skip

    # a refresh without a proof, or with another key's, is refused and spends nothing
    missing = await refresh_with(first["refresh_token"])
    assert missing.status == 400
    assert (await missing.json())["error"] == "invalid_dpop_proof"
    assert "send a DPoP proof" in (await missing.json())["error_description"]
    other = await refresh_with(first["refresh_token"], proof(client, OTHER))
    assert other.status == 400
    assert (await other.json())["error"] == "invalid_dpop_proof"
    assert "another DPoP key" in (await other.json())["error_description"]
    renewed = await refresh_with(first["refresh_token"], proof(client))
    assert renewed.status == 200, await renewed.text()
    second = await renewed.json()
    assert second["token_type"] == "DPoP"
    [payload] = await db.pool.fetch("SELECT payload FROM events WHERE type = 'TokenRefreshed'")
    assert json.loads(payload["payload"])["dpop_jkt"] == KEY.thumbprint()
    rs = await rs_headers(client)
    looked = await client.post("/oauth/introspect", data={"token": second["access_token"]},
                               headers=rs)  # fmt: skip
    body = await looked.json()
    assert body["active"] is True
    assert body["token_type"] == "DPoP"
    assert body["cnf"] == {"jkt": KEY.thumbprint()}
    revoked = await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'TokenRevoked'")
    assert revoked == 0


async def test_a_confidential_clients_grant_is_held_to_its_authentication_not_a_key(
    client, company, db
):
    """RFC 9449 §5: a refresh token issued to a confidential client is not bound to the
    proof's key; the client may refresh with another key, or none. Each access token is
    bound to its own request's proof."""
    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    code = await code_for(client, company, app)
    response = await client.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": app["redirect_uri"],
        },
        headers=basic(app["client_id"], app["client_secret"]) | {"DPoP": proof(client)},
    )
    assert response.status == 200, await response.text()
    first = await response.json()
    assert first["token_type"] == "DPoP"
    [issued] = await db.pool.fetch("SELECT payload FROM events WHERE type = 'AccessTokenIssued'")
    assert json.loads(issued["payload"])["dpop_jkt"] == KEY.thumbprint()
    assert json.loads(issued["payload"])["binds_grant"] is False
    # the key changed: the grant goes on, its new access token bound to the new key
    rotated = await refresh(client, app, first["refresh_token"], proof(client, OTHER))
    assert rotated.status == 200, await rotated.text()
    second = await rotated.json()
    assert second["token_type"] == "DPoP"
    rs = await rs_headers(client)
    looked = await client.post("/oauth/introspect", data={"token": second["access_token"]},
                               headers=rs)  # fmt: skip
    assert (await looked.json())["cnf"] == {"jkt": OTHER.thumbprint()}
    # and without a proof: a Bearer token
    plain = await refresh(client, app, second["refresh_token"])
    assert plain.status == 200, await plain.text()
    assert (await plain.json())["token_type"] == "Bearer"
    revoked = await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'TokenRevoked'")
    assert revoked == 0


@pytest.mark.parametrize("public", [True, False], ids=["public-client", "confidential-client"])
async def test_a_public_clients_refresh_with_a_proof_binds_the_grant(client, company, public):
    """RFC 9449 §5: a refresh token issued to a public client in answer to a request with a
    proof is bound to its key: the grant, unbound until then, needs that key from then on.
    A confidential client's stays held to its own authentication."""
    from tests.e2e.test_native_apps import code_at, exchange, public_app

    verifier, challenge = pkce()
    if public:
        app = await public_app(client, company)
        code = await code_at(client, company, app, app["redirect_uri"], challenge)
        redeemed = await exchange(client, app, code, verifier, app["redirect_uri"])
        credentials = {"client_id": app["client_id"]}
        auth: dict[str, str] = {}
    else:
        app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
        code = await code_for(client, company, app)
        redeemed = await client.post(
            "/oauth/token",
            data={"grant_type": "authorization_code", "code": code,
                  "redirect_uri": app["redirect_uri"]},
            headers=basic(app["client_id"], app["client_secret"]),
        )  # fmt: skip
        credentials, auth = {}, basic(app["client_id"], app["client_secret"])
    first = await redeemed.json()
    assert first["token_type"] == "Bearer"  # redeemed without a proof: not bound

    async def refresh_with(refresh_token: str, dpop: str | None = None):
        headers = auth | ({"DPoP": dpop} if dpop is not None else {})
        return await client.post(
            "/oauth/token",
            data={"grant_type": "refresh_token", "refresh_token": refresh_token, **credentials},
            headers=headers,
        )

    bound = await refresh_with(first["refresh_token"], proof(client))
    assert bound.status == 200, await bound.text()
    second = await bound.json()
    assert second["token_type"] == "DPoP"
    without = await refresh_with(second["refresh_token"])
    if public:
        assert without.status == 400
        assert (await without.json())["error"] == "invalid_dpop_proof"
        other = await refresh_with(second["refresh_token"], proof(client, OTHER))
        assert other.status == 400
        again = await refresh_with(second["refresh_token"], proof(client))
        assert again.status == 200 and (await again.json())["token_type"] == "DPoP"
    else:
        assert without.status == 200 and (await without.json())["token_type"] == "Bearer"


async def test_introspection_of_a_bearer_token_shows_no_cnf(client, company):
    app = await new_app(client, company)
    token = (await (await cc_request(client, app)).json())["access_token"]
    rs = await rs_headers(client)
    body = await (await client.post("/oauth/introspect", data={"token": token}, headers=rs)).json()
    assert body["token_type"] == "Bearer"
    assert "cnf" not in body
    bound = await bound_cc_token(client, app)
    body = await (await client.post("/oauth/introspect", data={"token": bound}, headers=rs)).json()
    assert body["cnf"] == {"jkt": KEY.thumbprint()}


async def test_a_replayed_proof_is_refused(client, company, db):
    app = await new_app(client, company)
    value = proof(client)
    assert (await cc_request(client, app, value)).status == 200
    again = await cc_request(client, app, value)
    assert again.status == 400
    assert (await again.json())["error"] == "invalid_dpop_proof"
    assert "used already" in (await again.json())["error_description"]
    issued = await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'AccessTokenIssued'")
    assert issued == 1


async def test_a_refused_token_request_records_nothing_of_its_proof(client, company, db):
    """Before, the proof's single use was recorded before the grant was decided: a public
    client's id and a made-up code, or a scope too wide, put a DpopProofAccepted in the
    company's log for every request, and anyone who knew a public client's id could."""
    public = await new_app(
        client, company, grant_type="authorization_code", ip_allowlist=[],
        redirect_uri="http://127.0.0.1/cb", token_endpoint_auth_method="none",
    )  # fmt: skip
    app = await new_app(client, company)
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    for _ in range(3):
        made_up = await client.post(
            "/oauth/token",
            data={"grant_type": "authorization_code", "client_id": public["client_id"],
                  "code": "made-up"},
            headers={"DPoP": proof(client)},
        )  # fmt: skip
        assert made_up.status == 400 and (await made_up.json())["error"] == "invalid_grant"
    value = proof(client)
    too_wide = await cc_request(client, app, value, scope="payments:admin")
    assert too_wide.status == 400 and (await too_wide.json())["error"] == "invalid_scope"
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before
    # the proof was not spent by a request that was refused; granted, it is
    assert (await cc_request(client, app, value)).status == 200
    assert await accepted(db) == 1
    assert (await cc_request(client, app, value)).status == 400


async def test_a_proof_is_accepted_once_across_two_processes(client, company, db, settings):
    from aiohttp.test_utils import TestClient, TestServer

    from service.app import create_app
    from service.storage.database import Database

    app = await new_app(client, company)
    other = TestClient(
        TestServer(create_app(settings, database=Database(db.dsn, db.pool)), host="127.0.0.1")
    )
    await other.start_server()
    try:
        for _ in range(3):
            value = proof(client)
            answers = await asyncio.gather(
                cc_request(client, app, value),
                cc_request(other, app, value),
                cc_request(other, app, value),
            )
            assert sorted(a.status for a in answers) == [200, 400, 400]
        # at a resource too: one proof, two processes, one answer allowed
        token = await bound_cc_token(client, app)
        value = proof(client, htm="GET", path="/api/v1/whoami", token=token)
        assert (await whoami(other, token, value)).status == 200
        replayed = await whoami(client, token, value)
        assert replayed.status == 401
        assert 'error="invalid_dpop_proof"' in replayed.headers["WWW-Authenticate"]
    finally:
        await other.close()


def _none_alg(client) -> str:
    def b64(data):
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    header = {"typ": "dpop+jwt", "alg": "none", "jwk": KEY.as_dict(private=False)}
    claims = {"jti": "x", "htm": "POST", "htu": f"{issuer(client)}/oauth/token"}
    return f"{b64(header)}.{b64(claims | {'iat': int(time.time())})}."


def _hs256(client) -> str:
    secret = OctKey.generate_key(256)
    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": KEY.as_dict(private=False)}
    claims = {"jti": "y", "htm": "POST", "htu": f"{issuer(client)}/oauth/token", "iat": 1}
    return jws.serialize_compact(header, json.dumps(claims), secret, algorithms=["HS256"])


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda c: proof(c, htm="GET"), id="wrong-htm"),
        pytest.param(lambda c: proof(c, path="/oauth/revoke"), id="wrong-htu"),
        pytest.param(lambda c: proof(c, htu="https://evil.example/oauth/token"), id="other-host"),
        pytest.param(lambda c: proof(c, iat=int(time.time()) - 3600), id="stale-iat"),
        pytest.param(lambda c: proof(c, iat=int(time.time()) + 3600), id="future-iat"),
        pytest.param(lambda c: proof(c, header_jwk=OTHER.as_dict(private=False)), id="other-key"),
        pytest.param(lambda c: proof(c, header_jwk=KEY.as_dict(private=True)), id="private-jwk"),
        pytest.param(lambda c: proof(c, jti=None), id="no-jti"),
        # what Python's json reads and JSON is not: a NaN passes every comparison, a lone
        # surrogate fails every encode()
        pytest.param(lambda c: proof(c, iat=float("nan")), id="nan-iat"),
        pytest.param(lambda c: proof(c, jti="\ud800"), id="lone-surrogate-jti"),
        pytest.param(lambda c: proof(c, iat=10**400), id="huge-iat"),
        pytest.param(_none_alg, id="alg-none"),
        pytest.param(_hs256, id="hs256"),
        pytest.param(lambda c: "not a jwt", id="garbage"),
        pytest.param(lambda c: "", id="empty"),
    ],
)
async def test_a_bad_proof_at_the_token_endpoint_is_400_invalid_dpop_proof(
    client, company, db, make
):
    app = await new_app(client, company)
    response = await cc_request(client, app, make(client))
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "invalid_dpop_proof"
    assert response.headers["Cache-Control"] == "no-store"
    issued = await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'AccessTokenIssued'")
    assert issued == 0


async def test_an_rsa_proof_is_accepted(client, company):
    app = await new_app(client, company)
    response = await cc_request(client, app, proof(client, RSA, alg="PS256"))
    assert response.status == 200
    assert (await response.json())["token_type"] == "DPoP"


async def test_two_dpop_headers_are_refused(client, company):
    app = await new_app(client, company)
    headers = basic(app["client_id"], app["client_secret"])
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=[*headers.items(), ("DPoP", proof(client)), ("DPoP", proof(client))],
    )
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_dpop_proof"


# --- applications that require DPoP --------------------------------------------------


async def test_an_application_requiring_dpop_refuses_a_plain_request(client, company, db):
    app = await new_app(client, company, dpop_bound_access_tokens=True)
    assert app["dpop_bound_access_tokens"] is True
    plain = await cc_request(client, app)
    assert plain.status == 400
    assert (await plain.json())["error"] == "invalid_dpop_proof"
    assert (await cc_request(client, app, proof(client))).status == 200
    # switched off and on with PATCH, recorded as an event each time
    path = f"/admin/applications/{app['client_id']}"
    patched = await client.patch(
        path, json={"dpop_bound_access_tokens": False}, headers=company.auth
    )
    assert (await patched.json())["dpop_bound_access_tokens"] is False
    assert (await cc_request(client, app)).status == 200
    types = await db.pool.fetch(
        "SELECT payload FROM events WHERE type = 'DpopBoundAccessTokensChanged' ORDER BY position"
    )
    assert [json.loads(t["payload"])["after"] for t in types] == [True, False]
    await caught_up(client)  # the applications table is a projection: it follows the log
    column = await db.pool.fetchval(
        "SELECT dpop_bound_access_tokens FROM applications WHERE client_id = $1",
        app["client_id"],
    )
    assert column is False
    listed = await (await client.get("/admin/applications", headers=company.auth)).json()
    assert listed["applications"][0]["dpop_bound_access_tokens"] is False


async def test_with_dpop_nonce_off_no_nonce_is_asked_for_or_handed_out(client, company, db):
    assert client.app[CONTEXT].settings.dpop_nonce == "off"  # the default
    app = await new_app(client, company)
    response = await cc_request(client, app, proof(client))
    assert response.status == 200, await response.text()
    assert "DPoP-Nonce" not in response.headers
    token = (await response.json())["access_token"]
    answer = await whoami(
        client, token, proof(client, htm="GET", path="/api/v1/whoami", token=token)
    )
    assert answer.status == 200, await answer.text()
    assert "DPoP-Nonce" not in answer.headers
    # a nonce the client has from another server is not looked at
    elsewhere = await cc_request(client, app, proof(client, nonce="from another server"))
    assert elsewhere.status == 200
    assert await db.pool.fetchval("SELECT count(*) FROM dpop_nonces") == 0


async def test_the_metadata_lists_the_dpop_algorithms(client):
    document = await (await client.get("/.well-known/oauth-authorization-server")).json()
    algs = document["dpop_signing_alg_values_supported"]
    assert {"ES256", "RS256", "PS256"} <= set(algs)
    assert "none" not in algs and "HS256" not in algs


# --- resources: the gateway and /policy/check ----------------------------------------


async def test_the_gateway_refuses_a_bound_token_without_its_proof(client, company, db):
    app = await new_app(client, company)
    token = await bound_cc_token(client, app)
    at = {"htm": "GET", "path": "/api/v1/whoami"}
    as_bearer = await whoami(client, token, scheme="Bearer")
    assert as_bearer.status == 401
    assert as_bearer.headers["WWW-Authenticate"].startswith("DPoP ")
    assert 'error="invalid_token"' in as_bearer.headers["WWW-Authenticate"]
    for refused in (
        None,  # no proof
        proof(client, **at),  # no ath
        proof(client, token="tgat_another", **at),  # the ath of another token
        proof(client, OTHER, token=token, **at),  # another key
        proof(client, token=token, htm="POST", path="/api/v1/whoami"),
        proof(client, token=token, htm="GET", path="/api/v1/other"),
        proof(client, token=token, iat=int(time.time()) - 3600, **at),
        proof(client, token=token, iat=float("nan"), **at),
        proof(client, token=token, jti="\ud800", **at),
    ):
        answer = await whoami(client, token, refused)
        assert answer.status == 401, refused
        assert 'DPoP algs="' in answer.headers["WWW-Authenticate"]
        assert 'error="invalid_dpop_proof"' in answer.headers["WWW-Authenticate"]
    # a Bearer token sent as a DPoP one is no DPoP token
    bearer = (await (await cc_request(client, app)).json())["access_token"]
    assert (await whoami(client, bearer, scheme="Bearer")).status == 200
    wrong = await whoami(client, bearer, proof(client, token=bearer, **at))
    assert wrong.status == 401
    # nothing was revoked: a proof failure is not a stolen token's use
    assert (await whoami(client, token, proof(client, token=token, **at))).status == 200


async def test_the_gateway_answers_a_dpop_request_in_the_dpop_scheme(client, company):
    """RFC 9449 §7.1: a request made with the DPoP scheme is challenged in it, whatever
    refused it; one without a token is offered both schemes (§7.2). A Bearer request
    still gets a Bearer challenge."""
    app = await new_app(client, company, permissions=["invoices:read"])
    token = await bound_cc_token(client, app)

    async def dpop_request(method: str, path: str):
        headers = {"Authorization": f"DPoP {token}",
                   "DPoP": proof(client, token=token, htm=method, path=path)}  # fmt: skip
        return await client.request(method, path, headers=headers, json={})

    missing = await dpop_request("POST", "/api/v1/invoices")  # needs invoices:write
    assert missing.status == 403
    assert (await missing.json())["error"] == "insufficient_scope"
    challenge = missing.headers["WWW-Authenticate"]
    assert challenge.startswith('DPoP algs="'), challenge
    assert 'error="insufficient_scope", scope="invoices:write"' in challenge
    assert "Bearer" not in challenge
    uncovered = await dpop_request("GET", "/api/v1/nothing-routes-here")
    assert uncovered.status == 403
    assert uncovered.headers["WWW-Authenticate"].startswith('DPoP algs="')
    assert 'error="insufficient_scope"' in uncovered.headers["WWW-Authenticate"]
    for headers in ({}, {"Authorization": "Basic eDp5"}):
        none = await client.get("/api/v1/whoami", headers=headers)
        assert none.status == 401
        offered = none.headers["WWW-Authenticate"]
        assert offered.startswith('Bearer realm="tollgate", DPoP algs="'), offered
        assert "error=" not in offered  # no token, no error code (RFC 6750 §3.1)
    bearer = (await (await cc_request(client, app)).json())["access_token"]
    as_bearer = await client.post(
        "/api/v1/invoices", headers={"Authorization": f"Bearer {bearer}"}, json={}
    )
    assert as_bearer.status == 403
    assert as_bearer.headers["WWW-Authenticate"].startswith('Bearer realm="tollgate", error=')


async def test_policy_check_refuses_a_dpop_request_in_the_dpop_scheme(client, company):
    """RFC 9449 §7.1, as the gateway answers: /policy/check's 403s for a request made with
    the DPoP scheme (a missing permission, a disallowed address) carried a Bearer
    challenge, for the resource server to relay to its DPoP client."""
    app = await new_app(client, company, permissions=["invoices:read"])
    token = await bound_cc_token(client, app)
    rs = await rs_headers(client)
    url = "https://api.example/invoices/7"
    for ip, permission, error in (
        ("127.0.0.1", "invoices:write", "insufficient_scope"),
        ("192.0.2.9", None, "ip_not_allowed"),
    ):
        answer = await client.post(
            "/policy/check",
            json={"token": token, "ip": ip, "permission": permission, "htm": "GET", "htu": url,
                  "dpop_proof": proof(client, token=token, htu=url, htm="GET")},
            headers=rs,
        )  # fmt: skip
        assert answer.status == 403
        challenge = answer.headers["WWW-Authenticate"]
        assert challenge.startswith('DPoP algs="') and f'error="{error}"' in challenge


async def test_policy_check_requires_the_proof_of_a_bound_token(client, company, db):
    app = await new_app(client, company)
    token = await bound_cc_token(client, app)
    rs = await rs_headers(client)
    url = "https://api.example/invoices/7"

    async def check(**fields):
        return await client.post(
            "/policy/check", json={"token": token, "ip": "127.0.0.1", **fields}, headers=rs
        )

    def client_proof(**kw):
        claims = {"htu": url, "htm": "GET"} | kw
        return proof(client, token=token, **claims)

    without = await check()
    assert without.status == 401
    assert without.headers["WWW-Authenticate"].startswith("DPoP ")
    ok = await check(dpop_proof=client_proof(), htm="GET", htu=url + "?page=2")
    assert ok.status == 200, await ok.text()
    assert (await ok.json())["allow"] is True
    value = client_proof()
    assert (await check(dpop_proof=value, htm="GET", htu=url)).status == 200
    replay = await check(dpop_proof=value, htm="GET", htu=url)
    assert replay.status == 401
    assert (await replay.json())["error"] == "invalid_dpop_proof"
    for fields in (
        {"dpop_proof": client_proof(), "htm": "POST", "htu": url},
        {"dpop_proof": client_proof(), "htm": "GET", "htu": "https://api.example/other"},
        {
            "dpop_proof": proof(client, OTHER, token=token, htu=url, htm="GET"),
            "htm": "GET",
            "htu": url,
        },
        {"dpop_proof": proof(client, htu=url, htm="GET"), "htm": "GET", "htu": url},
        {"dpop_proof": client_proof(iat=float("nan")), "htm": "GET", "htu": url},
        {"dpop_proof": client_proof(jti="\ud800"), "htm": "GET", "htu": url},
    ):
        answer = await check(**fields)
        assert answer.status == 401
        assert (await answer.json())["error"] == "invalid_dpop_proof"
    missing = await check(dpop_proof=client_proof())
    assert missing.status == 400  # htm and htu are needed to check it
    assert await accepted(db) == 3  # one at the token endpoint, two checks allowed


async def test_a_proof_failure_from_a_disallowed_address_is_an_ip_violation(client, company, db):
    app = await new_app(client, company)
    token = await bound_cc_token(client, app)
    rs = await rs_headers(client)
    answer = await client.post(
        "/policy/check", json={"token": token, "ip": "198.51.100.7"}, headers=rs
    )
    assert answer.status == 403
    assert (await answer.json())["error"] == "ip_not_allowed"
    [violation] = await db.pool.fetch(
        "SELECT payload FROM events WHERE type = 'IpViolationDetected'"
    )
    assert json.loads(violation["payload"])["token_revoked"] is True


# --- nothing secret kept -------------------------------------------------------------


async def test_no_proof_or_token_in_the_log_the_database_or_log_lines(client, company, db):
    app = await new_app(client, company)
    sent: list[str] = []
    with structlog.testing.capture_logs() as lines:
        value = proof(client)
        sent.append(value)
        response = await cc_request(client, app, value)
        token = (await response.json())["access_token"]
        await cc_request(client, app, value)  # a replay
        bad = proof(client, htm="GET")
        sent.append(bad)
        await cc_request(client, app, bad)
        at_gateway = proof(client, htm="GET", path="/api/v1/whoami", token=token)
        sent.append(at_gateway)
        await whoami(client, token, at_gateway)
        await whoami(client, token, at_gateway)  # a replay
    logged = json.dumps(lines, default=str)
    dumped = []
    for table in ("events", "applications", "live_tokens"):
        dumped.append(str([tuple(r) for r in await db.pool.fetch(f"SELECT * FROM {table}")]))
    everything = logged + "".join(dumped)
    secret_bits = [token, *sent, *(s.split(".")[2] for s in sent), KEY.as_dict(private=True)["d"]]
    for bit in secret_bits:
        assert bit not in everything
    jti = json.loads(base64.urlsafe_b64decode(sent[0].split(".")[1] + "=="))["jti"]
    assert jti not in everything  # kept as a hash only


async def test_the_upstream_gets_neither_the_token_nor_the_proof(db, settings):
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from tests.conftest import make_company
    from tests.e2e.test_gateway import start

    seen: dict = {}

    async def echo(request: web.Request) -> web.Response:
        seen["headers"] = dict(request.headers)
        return web.Response(text="ok")

    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", echo)
    upstream = TestServer(upstream_app, host="127.0.0.1")
    await upstream.start_server()
    client = await start(db, settings, upstream_url=str(upstream.make_url("")).rstrip("/"))
    try:
        company = await make_company(client)
        app = await new_app(client, company, permissions=["invoices:read"])
        token = await bound_cc_token(client, app)
        value = proof(client, htm="GET", path="/api/v1/invoices/7", token=token)
        response = await client.get(
            "/api/v1/invoices/7?page=2", headers={"Authorization": f"DPoP {token}", "DPoP": value}
        )
        assert response.status == 200, await response.text()
        assert "Authorization" not in seen["headers"]
        assert "DPoP" not in seen["headers"]
        assert seen["headers"]["X-Tollgate-Client"] == app["client_id"]
    finally:
        await client.close()
        await upstream.close()


async def test_the_gateway_checks_htu_against_the_path_as_sent(db, settings):
    """A client signs the URL it sends, percent-encoded (RFC 9449 §4.3 item 9), compared
    after RFC 3986 §6.2.2 normalisation; the decoded path is no URI and matches nothing."""
    from yarl import URL

    from tests.conftest import make_company
    from tests.e2e.test_gateway import _echo_upstream, start

    upstream, _seen = await _echo_upstream()
    client = await start(db, settings, upstream_url=str(upstream.make_url("")).rstrip("/"))
    try:
        company = await make_company(client)
        app = await new_app(client, company, permissions=["invoices:read"])
        token = await bound_cc_token(client, app)

        async def get(path: str, signed: str) -> int:
            value = proof(client, htm="GET", path=signed, token=token)
            response = await client.get(
                URL(path, encoded=True), headers={"Authorization": f"DPoP {token}", "DPoP": value}
            )
            return response.status

        for path, signed, status in [
            ("/api/v1/invoices/a%20b", "/api/v1/invoices/a%20b", 200),
            ("/api/v1/invoices/caf%C3%A9", "/api/v1/invoices/caf%C3%A9", 200),
            ("/api/v1/invoices/caf%C3%A9", "/api/v1/invoices/caf%c3%a9", 200),  # hex case
            ("/api/v1/invoices/x%2By", "/api/v1/invoices/x%2By", 200),
            ("/api/v1/invoices/%7Ex", "/api/v1/invoices/~x", 200),  # unreserved, decoded
            ("/api/v1/invoices/a%20b", "/api/v1/invoices/a b", 401),
            ("/api/v1/invoices/x%2By", "/api/v1/invoices/x+y", 401),
        ]:
            assert await get(path, signed) == status, (path, signed)
    finally:
        await client.close()
        await upstream.close()


async def test_a_dpop_request_with_a_bad_token_gets_a_dpop_challenge(client, company):
    """RFC 9449 §7.1: whatever is wrong with the token, a request made with the DPoP scheme
    is answered with the DPoP challenge a DPoP client reads; a Bearer one with Bearer's."""
    app = await new_app(client, company)
    token = await bound_cc_token(client, app)
    revoked = await client.post(
        "/oauth/revoke",
        data={"token": token},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert revoked.status == 200
    at = {"htm": "GET", "path": "/api/v1/whoami"}
    for sent in (token, "abc", "tgat_" + "A" * 43):  # revoked, malformed, unknown
        answer = await whoami(client, sent, proof(client, token=sent, **at))
        assert answer.status == 401, sent
        challenge = answer.headers["WWW-Authenticate"]
        assert challenge.startswith('DPoP algs="'), challenge
        assert 'error="invalid_token"' in challenge
        as_bearer = await whoami(client, sent, scheme="Bearer")
        assert as_bearer.headers["WWW-Authenticate"].startswith("Bearer "), sent


async def test_a_code_bound_with_dpop_jkt_is_redeemed_only_with_that_key(client, company, db):
    """RFC 9449 §10: the client names its key in the authorization request; the code is
    then redeemed only with a proof by that key, and a refused redemption spends nothing."""
    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    code = await code_for(client, company, app, dpop_jkt=KEY.thumbprint())
    [issued] = await db.pool.fetch(
        "SELECT payload FROM events WHERE type = 'AuthorizationCodeIssued'"
    )
    assert json.loads(issued["payload"])["dpop_jkt"] == KEY.thumbprint()

    async def redeem(dpop: str | None):
        headers = basic(app["client_id"], app["client_secret"])
        if dpop is not None:
            headers["DPoP"] = dpop
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": app["redirect_uri"]}  # fmt: skip
        return await client.post("/oauth/token", data=form, headers=headers)

    for refused in (None, proof(client, OTHER)):
        answer = await redeem(refused)
        assert answer.status == 400
        body = await answer.json()
        assert body["error"] == "invalid_grant"
        assert "dpop_jkt" in body["error_description"]
    redeemed = await redeem(proof(client))
    assert redeemed.status == 200, await redeemed.text()
    assert (await redeemed.json())["token_type"] == "DPoP"
    assert await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'TokenRevoked'") == 0


async def test_a_malformed_dpop_jkt_is_sent_back_to_the_client(client, company):
    from urllib.parse import parse_qs, urlsplit

    from tests.e2e.oauth_helpers import authorize_url, sign_in

    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    url = authorize_url(app, dpop_jkt="not a thumbprint")
    await sign_in(client, company.admin_email, company.admin_password, url)
    response = await client.get(url, allow_redirects=False)
    assert response.status == 302
    query = parse_qs(urlsplit(response.headers["Location"]).query)
    assert query["error"] == ["invalid_request"]
    assert "dpop_jkt" in query["error_description"][0]
