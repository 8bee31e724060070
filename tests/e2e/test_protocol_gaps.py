"""Protocol details that close gaps: the issuer in the authorization response (RFC 9207),
the code's redirect never cached or referred, one client per request, introspection's
`iat` and `iss`, a rotated-away secret that confirms nothing, and the allow list at every
endpoint that authenticates a client."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

from service import events as ev
from service.app import CONTEXT
from service.notification.mail import build_message
from tests.e2e.oauth_helpers import (
    authorize_url,
    basic,
    cc_token,
    hidden_fields,
    new_app,
    query_of,
    sign_in,
)
from tests.e2e.test_gateway import from_address


def issuer(client) -> str:
    return client.app[CONTEXT].settings.issuer


async def answer_consent(client, url: str, decision: str):
    """The consent page answered as a browser does; the redirect response itself."""
    fields = hidden_fields(await (await client.get(url)).text())
    return await client.post(
        "/oauth/authorize", data=fields | {"decision": decision}, allow_redirects=False
    )


async def signed_in_app(client, company, **fields) -> dict:
    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[], **fields)
    await sign_in(client, company.admin_email, company.admin_password, authorize_url(app))
    return app


async def test_the_code_redirect_names_the_issuer_and_is_neither_cached_nor_referred(
    client, company
):
    app = await signed_in_app(client, company)
    response = await answer_consent(client, authorize_url(app, state="s1"), "approve")
    assert response.status == 302
    params = query_of(response.headers["Location"])
    assert params["code"] and params["state"] == "s1"
    assert params["iss"] == issuer(client)  # RFC 9207 §2
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"


async def test_error_redirects_name_the_issuer_too(client, company):
    app = await signed_in_app(client, company)
    denied = await answer_consent(client, authorize_url(app, state="d"), "deny")
    assert query_of(denied.headers["Location"]) == {
        "provider": "tollgate", "error": "access_denied", "state": "d", "iss": issuer(client),
    }  # fmt: skip
    bad_scope = await client.get(
        authorize_url(app, state="e", scope="nuclear:launch"), allow_redirects=False
    )
    assert bad_scope.status == 302
    params = query_of(bad_scope.headers["Location"])
    assert params["error"] == "invalid_scope"
    assert params["iss"] == issuer(client)


async def test_the_metadata_announces_iss_and_lists_only_registered_auth_methods(client):
    body = await (await client.get("/.well-known/oauth-authorization-server")).json()
    assert body["authorization_response_iss_parameter_supported"] is True
    registered = ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]
    assert body["token_endpoint_auth_methods_supported"] == registered
    assert body["revocation_endpoint_auth_methods_supported"] == registered
    # a public client ("none") has nothing to introspect with
    assert body["introspection_endpoint_auth_methods_supported"] == registered[:-1]


async def test_a_body_client_id_other_than_the_basic_one_is_invalid_request(client, company, db):
    app = await new_app(client, company)
    other = await new_app(client, company, name="Other app")
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "client_id": other["client_id"]},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"
    assert (
        await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'AccessTokenIssued'") == 0
    )
    same = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "client_id": app["client_id"]},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert same.status == 200  # naming the same client twice is no contradiction


async def issued_at(db, type_: str) -> list[int]:
    rows = await db.pool.fetch(
        "SELECT payload FROM events WHERE type = $1 ORDER BY position", type_
    )
    return [json.loads(row["payload"])["issued_at"] for row in rows]


async def introspect(client, app, token) -> dict:
    response = await client.post(
        "/oauth/introspect",
        data={"token": token},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert response.status == 200
    return await response.json()


async def test_introspection_says_when_and_by_whom_a_token_was_issued(client, company, db):
    app = await new_app(client, company)
    token = (await cc_token(client, app))["access_token"]
    answer = await introspect(client, app, token)
    [when] = await issued_at(db, "AccessTokenIssued")
    assert answer["iat"] == when
    assert abs(when - datetime.now(UTC).timestamp()) < 60
    assert answer["iss"] == issuer(client)
    assert await introspect(client, app, token + "x") == {"active": False}


async def test_a_refresh_tokens_iat_is_its_own_issue_time_not_the_grants(client, company, db):
    app = await signed_in_app(client, company)
    response = await answer_consent(client, authorize_url(app), "approve")
    code = query_of(response.headers["Location"])["code"]
    first = await (
        await client.post(
            "/oauth/token",
            data={"grant_type": "authorization_code", "code": code,
                  "redirect_uri": app["redirect_uri"]},
            headers=basic(app["client_id"], app["client_secret"]),
        )
    ).json()  # fmt: skip
    await asyncio.sleep(1.1)  # the next issue falls in a later second
    renewed = await (
        await client.post(
            "/oauth/token",
            data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
            headers=basic(app["client_id"], app["client_secret"]),
        )
    ).json()
    [granted] = await issued_at(db, "AccessTokenIssued")
    [rotated] = await issued_at(db, "TokenRefreshed")
    assert rotated > granted
    answer = await introspect(client, app, renewed["refresh_token"])
    assert answer["token_type"] == "refresh_token"
    assert answer["iat"] == rotated
    assert answer["iss"] == issuer(client)
    assert (await introspect(client, app, renewed["access_token"]))["iat"] == rotated


async def test_a_rotated_away_secret_gets_the_answer_a_wrong_secret_gets(client, company, db):
    app = await new_app(client, company)
    path = f"/admin/applications/{app['client_id']}/rotate-secret"
    assert (await client.post(path, headers=company.auth)).status == 200
    answers = []
    for secret in (app["client_secret"], "not-the-secret"):
        for endpoint, data in (
            ("/oauth/token", {"grant_type": "client_credentials"}),
            ("/oauth/introspect", {"token": "x"}),
            ("/oauth/revoke", {"token": "x"}),
        ):
            response = await client.post(
                endpoint, data=data, headers=basic(app["client_id"], secret)
            )
            answers.append(
                (endpoint, response.status, await response.json(),
                 response.headers["WWW-Authenticate"])
            )  # fmt: skip
    old, wrong = answers[:3], answers[3:]
    assert old == wrong
    assert old[0][1:3] == (401, {"error": "invalid_client",
                                 "error_description": "client authentication failed"})  # fmt: skip
    # nothing in the answer, everything in the log: the first use, then a count of the rest
    await client.app[CONTEXT].ledger.flush(everything=True)  # as when the window closes
    used = await db.pool.fetch(
        "SELECT type, payload FROM events WHERE type LIKE 'OldClientSecretUse%' ORDER BY position"
    )
    assert [row["type"] for row in used] == ["OldClientSecretUsed", "OldClientSecretUsesCoalesced"]
    assert json.loads(used[1]["payload"])["count"] == 2


async def test_revoke_and_introspect_hold_valid_credentials_to_the_allow_list(client, company, db):
    app = await new_app(client, company, ip_allowlist=["127.0.0.1/32"])
    token = (await cc_token(client, app))["access_token"]
    credentials = basic(app["client_id"], app["client_secret"])
    async with from_address(client, "127.0.0.2") as outsider:
        for endpoint in ("/oauth/revoke", "/oauth/introspect"):
            response = await outsider.post(endpoint, data={"token": token}, headers=credentials)
            assert response.status == 403, endpoint
            assert (await response.json())["error"] == "ip_not_allowed"
            guess = await outsider.post(
                endpoint, data={"token": token}, headers=basic(app["client_id"], "guess")
            )
            assert guess.status == 401  # a wrong secret learns nothing and is no violation
    assert (await introspect(client, app, token))["active"] is True  # nothing was revoked
    # the window's first attempt is an IpViolationDetected, the next one (same application
    # and address) is counted in the summary recorded when the window closes
    await client.app[CONTEXT].ledger.flush(everything=True)
    rows = await db.pool.fetch(
        "SELECT endpoint, ip, token_revoked, count, coalesced FROM v_ip_violations "
        "ORDER BY position"
    )
    assert [tuple(row) for row in rows] == [
        ("revoke", "127.0.0.2", False, 1, False), ("introspect", "127.0.0.2", False, 1, True),
    ]  # fmt: skip
    metrics = await (await client.get("/metrics")).text()
    assert 'tollgate_ip_violations_total{endpoint="revoke"} 1.0' in metrics
    assert 'tollgate_ip_violations_total{endpoint="introspect"} 1.0' in metrics


async def test_a_public_client_outside_its_allow_list_is_refused_without_a_violation(
    client, company, db
):
    """Its client_id is in every authorization URL and proves nothing: anyone could raise
    a violation, and an email to the company, from every address they have. Refused all
    the same."""
    app = await new_app(
        client, company, grant_type="authorization_code", ip_allowlist=["127.0.0.1/32"],
        token_endpoint_auth_method="none",
    )  # fmt: skip
    async with from_address(client, "127.0.0.2") as outsider:
        for endpoint, form in [
            ("/oauth/revoke", {"token": "x"}),
            ("/oauth/token", {"grant_type": "authorization_code", "code": "x"}),
        ]:
            form = form | {"client_id": app["client_id"]}
            response = await outsider.post(endpoint, data=form)
            assert response.status == 403, endpoint
            assert (await response.json())["error"] == "ip_not_allowed"
    await client.app[CONTEXT].ledger.flush(everything=True)
    assert await db.pool.fetchval("SELECT count(*) FROM v_ip_violations") == 0
    assert not await db.pool.fetchval(
        "SELECT count(*) FROM events WHERE type = 'IpViolationDetected'"
    )


def test_the_alert_email_names_the_endpoint_that_refused_the_client():
    for endpoint, where in (("revoke", "POST /oauth/revoke"),
                            ("introspect", "POST /oauth/introspect")):  # fmt: skip
        message = build_message(
            position=7,
            violation=ev.IpViolationDetected(
                company_id="co", client_id="cid", ip="198.51.100.9", endpoint=endpoint
            ),
            app_name="Billing",
            recorded_at=datetime.now(UTC),
            recipients=["sec@acme.example"],
            mail_from="tollgate@alerts.example",
        )
        text = message.get_content()
        assert where in text
        assert "the token was not revoked" not in text


async def test_two_authorization_headers_are_refused_wherever_one_is_read(client, company, db):
    """RFC 9110 §11.6.2: Authorization is no list. The first was taken and the second passed
    over: a proxy or log that reads the last saw another caller than the one acted on."""
    app = await new_app(client, company)
    theirs = basic(app["client_id"], app["client_secret"])["Authorization"]
    token = (await cc_token(client, app))["access_token"]
    admin = company.auth["Authorization"]
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    twice = [
        ("POST", "/oauth/token", {"grant_type": "client_credentials"}, theirs),
        ("POST", "/oauth/revoke", {"token": token}, theirs),
        ("POST", "/oauth/introspect", {"token": token}, theirs),
        ("GET", "/api/v1/whoami", None, f"Bearer {token}"),
        ("GET", "/admin/applications", None, admin),
    ]
    for method, path, form, first in twice:
        headers = [("Authorization", first), ("Authorization", "Basic Zm9vOmJhcg==")]
        response = await client.request(method, path, data=form, headers=headers)
        assert response.status == 400, (path, await response.text())
        body = await response.json()
        assert "Authorization header is given more than once" in body["error_description"], body
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before  # nothing done
    # one of them, as before
    assert (
        await client.get("/api/v1/whoami", headers={"Authorization": f"Bearer {token}"})
    ).status == 200
