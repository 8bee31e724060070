"""The authorization-code flow end to end: sign-in, consent, code, PKCE, refresh rotation,
reuse detection; revocation, introspection, metadata, connections and permissions."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from service import events as ev
from service.app import CONTEXT
from service.eventlog import Metadata
from service.oauth import tokens
from tests.e2e.oauth_helpers import (
    REDIRECT,
    authorize_url,
    basic,
    cc_token,
    code_for,
    consent,
    hidden_fields,
    hidden_inputs,
    new_app,
    pkce,
    query_of,
    sign_in,
)


async def exchange(client, app, code, verifier=None, redirect_uri=None, secret=None):
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri or app["redirect_uri"],
    }
    if verifier:
        data["code_verifier"] = verifier
    return await client.post(
        "/oauth/token", data=data, headers=basic(app["client_id"], secret or app["client_secret"])
    )


async def refresh(client, app, refresh_token, **extra):
    return await client.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token, **extra},
        headers=basic(app["client_id"], app["client_secret"]),
    )


async def introspect(client, app, token) -> dict:
    response = await client.post(
        "/oauth/introspect",
        data={"token": token},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert response.status == 200
    return await response.json()


@pytest.fixture
def settings(settings):
    """No refresh-reuse grace here: these tests pin what reuse does once it has passed
    (test_refresh_grace.py covers the grace itself)."""
    return dataclasses.replace(settings, refresh_reuse_grace=0)


@pytest.fixture
async def ac_app(client, company):
    return await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])


async def test_full_flow_with_pkce_and_refresh(client, company, ac_app, db):
    verifier, challenge = pkce()
    url = authorize_url(ac_app, challenge=challenge, state="s-123")
    login_page = await client.get(url)
    assert "Sign in" in await login_page.text()  # no session yet
    [cookie] = await sign_in(client, company.admin_email, company.admin_password, url)
    assert cookie.startswith("tg_session=")
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    page = await (await client.get(url)).text()
    assert "Test app" in page and "invoices:read" in page and "Read invoices" in page
    location = await consent(client, url)
    params = query_of(location)
    assert location.startswith(REDIRECT + "&")  # the registered URI, its query kept
    assert params["state"] == "s-123"
    response = await exchange(client, ac_app, params["code"], verifier)
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert body["expires_in"] == 7200
    assert body["token_type"] == "Bearer"
    assert tokens.well_formed(body["refresh_token"], tokens.REFRESH)
    assert (await introspect(client, ac_app, body["access_token"]))["active"] is True

    renewed = await refresh(client, ac_app, body["refresh_token"])
    assert renewed.status == 200
    second = await renewed.json()
    assert second["refresh_token"] != body["refresh_token"]
    assert second["expires_in"] == 7200
    # the spent refresh token again: the whole family dies (RFC 9700 §4.14.2)
    reused = await refresh(client, ac_app, body["refresh_token"])
    assert reused.status == 400
    assert (await reused.json())["error"] == "invalid_grant"
    assert (await introspect(client, ac_app, second["access_token"])) == {"active": False}
    assert (await refresh(client, ac_app, second["refresh_token"])).status == 400
    revoked = await db.pool.fetch("SELECT payload FROM events WHERE type = 'TokenRevoked'")
    assert [json.loads(r["payload"])["reason"] for r in revoked] == ["refresh_reuse"]
    assert (
        await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'ConnectionGranted'") == 1
    )


async def test_a_code_is_single_use_and_a_second_use_revokes_its_tokens(
    client, company, ac_app, db
):
    code = await code_for(client, company, ac_app)
    first = await (await exchange(client, ac_app, code)).json()
    again = await exchange(client, ac_app, code)
    assert again.status == 400
    assert (await again.json())["error"] == "invalid_grant"
    assert await introspect(client, ac_app, first["access_token"]) == {"active": False}
    assert (await refresh(client, ac_app, first["refresh_token"])).status == 400
    assert (
        await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'AuthorizationCodeReused'")
        == 1
    )


async def test_redirect_uri_and_pkce_are_checked_at_the_token_endpoint(client, company, ac_app):
    verifier, challenge = pkce()
    code = await code_for(client, company, ac_app, challenge=challenge)
    for response in (
        await exchange(client, ac_app, code, verifier, redirect_uri="https://app.example/callback"),
        await exchange(client, ac_app, code, "x" * 50),
        await exchange(client, ac_app, code),
    ):
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_grant"
    assert (await exchange(client, ac_app, code, verifier)).status == 200


async def test_an_expired_code_is_refused(client, company, ac_app):
    ctx = client.app[CONTEXT]
    code = tokens.new(tokens.CODE)
    user = ctx.directory.user_by_email(company.admin_email)
    await ctx.record(
        f"connection-{company.company_id}-{ac_app['client_id']}",
        None,
        [
            ev.ConnectionGranted(
                company_id=company.company_id,
                client_id=ac_app["client_id"],
                user_id=user.user_id,
                permissions=["invoices:read"],
            )
        ],
        Metadata(),
    )
    await ctx.record(
        "code-expired",
        0,
        [
            ev.AuthorizationCodeIssued(
                company_id=company.company_id,
                client_id=ac_app["client_id"],
                user_id=user.user_id,
                code_hash=tokens.token_hash(code),
                redirect_uri=ac_app["redirect_uri"],
                permissions=["invoices:read"],
                code_challenge=None,
                expires_at=int(time.time()) - 1,
            )
        ],
        Metadata(),
    )
    response = await exchange(client, ac_app, code)
    assert response.status == 400
    assert "expired" in (await response.json())["error_description"]


async def test_another_clients_code_is_invalid_grant(client, company, ac_app):
    other = await new_app(client, company, grant_type="authorization_code", name="Other")
    code = await code_for(client, company, ac_app)
    response = await exchange(client, other, code, redirect_uri=ac_app["redirect_uri"])
    assert (await response.json())["error"] == "invalid_grant"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"redirect_uri": "https://evil.example/cb"}, "redirect"),
        ({"client_id": "unknown"}, "Unknown application"),
        ({"client_secret": "leaked"}, "client_secret"),
    ],
)
async def test_authorize_errors_are_pages_never_redirects(client, company, ac_app, change, needle):
    url = authorize_url(ac_app, **{k: v for k, v in change.items() if k == "client_secret"})
    if "redirect_uri" in change:
        url = url.replace(
            "redirect_uri=https",
            "redirect_uri="
            + change["redirect_uri"].replace(":", "%3A").replace("/", "%2F")
            + "&x=https",
        )
    if "client_id" in change:
        url = url.replace(ac_app["client_id"], change["client_id"])
    response = await client.get(url, allow_redirects=False)
    assert response.status == 400
    assert "Location" not in response.headers
    text = await response.text()
    assert needle.lower() in text.lower()
    assert text.startswith("<!doctype html>")


async def test_authorize_errors_after_the_redirect_check_go_back_with_state(
    client, company, ac_app
):
    await sign_in(client, company.admin_email, company.admin_password, authorize_url(ac_app))
    for extra, error in (
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"response_type": ""}, "invalid_request"),  # empty is missing (RFC 6749 §3.1)
        ({"response_type": None}, "invalid_request"),  # missing
        ({"scope": "payments:write"}, "invalid_scope"),
        ({"code_challenge": "a" * 43, "code_challenge_method": "plain"}, "invalid_request"),
    ):
        given = "&".join(f"{k}={v}" for k, v in extra.items() if v is not None)
        url = authorize_url(ac_app, state="st") + ("&" + given if given else "")
        if "response_type" in extra:
            url = url.replace("response_type=code&", "")
        response = await client.get(url, allow_redirects=False)
        assert response.status == 302, await response.text()
        params = query_of(response.headers["Location"])
        assert params["error"] == error
        assert params["state"] == "st"


async def test_before_sign_in_an_error_shows_the_sign_in_page_not_a_redirect(client, company, db):
    """RFC 9700 §4.11.2: whoever registered the URI (any company can), the server must
    authenticate the user before it redirects there, or it is a redirector for phishing."""
    app = await new_app(
        client, company, grant_type="authorization_code", ip_allowlist=[],
        redirect_uri="https://phish.example/landing",
    )  # fmt: skip
    for extra in ({"response_type": "token"}, {"scope": "nuclear:launch"}):
        url = authorize_url(app, **extra)
        if "response_type" in extra:
            url = url.replace("response_type=code&", "", 1)
        response = await client.get(url, allow_redirects=False)
        assert response.status == 200, extra
        assert "Sign in" in await response.text()
        assert "Location" not in response.headers


async def test_an_empty_redirect_uri_is_a_missing_one(client, company, ac_app):
    code = await code_for(client, company, ac_app)
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": ""},
        headers=basic(ac_app["client_id"], ac_app["client_secret"]),
    )
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "invalid_request"  # not invalid_grant: nothing to compare
    assert "redirect_uri" in body["error_description"]


async def test_deny_redirects_with_access_denied(client, company, ac_app, db):
    url = authorize_url(ac_app, state="d")
    await sign_in(client, company.admin_email, company.admin_password, url)
    params = query_of(await consent(client, url, decision="deny"))
    assert params == {
        "provider": "tollgate",
        "error": "access_denied",
        "state": "d",
        "iss": client.app[CONTEXT].settings.issuer,  # RFC 9207
    }
    assert (
        await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'AuthorizationCodeIssued'")
        == 0
    )


async def test_consent_without_its_csrf_token_is_refused(client, company, ac_app, db):
    url = authorize_url(ac_app)
    await sign_in(client, company.admin_email, company.admin_password, url)
    response = await client.post(
        "/oauth/authorize",
        data={
            "client_id": ac_app["client_id"],
            "redirect_uri": ac_app["redirect_uri"],
            "decision": "approve",
            "csrf_token": "forged",
        },
        allow_redirects=False,
    )
    assert response.status == 403
    assert (
        await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'AuthorizationCodeIssued'")
        == 0
    )


async def test_any_company_can_connect_an_authorization_code_app(
    client, company, other_company, ac_app, db
):
    code = await code_for(client, other_company, ac_app)
    body = await (await exchange(client, ac_app, code)).json()
    info = await introspect(client, ac_app, body["access_token"])
    assert info["company_id"] == other_company.company_id
    connections = await (await client.get("/admin/connections", headers=other_company.auth)).json()
    assert [c["client_id"] for c in connections["connections"]] == [ac_app["client_id"]]
    assert (await (await client.get("/admin/connections", headers=company.auth)).json()) == {
        "connections": []
    }


async def test_revoking_a_connection_kills_its_tokens(client, company, ac_app):
    body = await (await exchange(client, ac_app, await code_for(client, company, ac_app))).json()
    response = await client.delete(
        f"/admin/connections/{ac_app['client_id']}", headers=company.auth
    )
    assert response.status == 204
    assert await introspect(client, ac_app, body["access_token"]) == {"active": False}
    assert (await refresh(client, ac_app, body["refresh_token"])).status == 400
    assert (
        await client.delete(f"/admin/connections/{ac_app['client_id']}", headers=company.auth)
    ).status == 404


async def test_a_code_issued_before_a_connection_is_revoked_dies_with_it(
    client, company, other_company, ac_app
):
    """A code not yet redeemed when its company withdraws the connection is not redeemed
    after a later consent: it carries the withdrawn request. Another company's codes for
    the same application stay."""
    old = await code_for(client, company, ac_app)
    client.session.cookie_jar.clear()  # another user, in another browser
    theirs = await code_for(client, other_company, ac_app)
    revoked = await client.delete(f"/admin/connections/{ac_app['client_id']}", headers=company.auth)
    assert revoked.status == 204
    client.session.cookie_jar.clear()
    fresh = await code_for(client, company, ac_app)  # consented again
    stale = await exchange(client, ac_app, old)
    assert stale.status == 400 and (await stale.json())["error"] == "invalid_grant"
    assert (await exchange(client, ac_app, fresh)).status == 200
    assert (await exchange(client, ac_app, theirs)).status == 200


async def test_removing_a_permission_strips_it_everywhere_and_adding_one_does_not_extend(
    client, company, ac_app
):
    body = await (await exchange(client, ac_app, await code_for(client, company, ac_app))).json()
    assert (await introspect(client, ac_app, body["access_token"]))[
        "scope"
    ] == "debtors:read invoices:read"
    path = f"/admin/applications/{ac_app['client_id']}"
    await client.patch(path, json={"permissions": ["invoices:read"]}, headers=company.auth)
    assert (await introspect(client, ac_app, body["access_token"]))["scope"] == "invoices:read"
    connections = await (await client.get("/admin/connections", headers=company.auth)).json()
    assert connections["connections"][0]["permissions"] == ["invoices:read"]
    await client.patch(
        path,
        json={"permissions": ["invoices:read", "debtors:read", "payments:read"]},
        headers=company.auth,
    )
    assert (await introspect(client, ac_app, body["access_token"]))["scope"] == "invoices:read"
    renewed = await (await refresh(client, ac_app, body["refresh_token"])).json()
    assert renewed["scope"] == "invoices:read"  # users must authorise again to grant more


async def test_a_removed_permission_does_not_come_back_to_a_code_not_yet_redeemed(
    client, company, ac_app
):
    """SPEC §2: a removed permission leaves every existing grant, and a permission added
    again does not come back to one: a code issued before the removal included. Consented
    again meanwhile, the connection holds the permission once more."""
    pending = await code_for(client, company, ac_app)
    path = f"/admin/applications/{ac_app['client_id']}"
    both = ["invoices:read", "debtors:read"]
    for permissions in (["invoices:read"], both):
        changed = await client.patch(path, json={"permissions": permissions}, headers=company.auth)
        assert changed.status == 200, await changed.text()
    client.session.cookie_jar.clear()
    fresh = await (await exchange(client, ac_app, await code_for(client, company, ac_app))).json()
    assert fresh["scope"] == "debtors:read invoices:read"
    redeemed = await exchange(client, ac_app, pending)
    assert redeemed.status == 200, await redeemed.text()
    body = await redeemed.json()
    assert body["scope"] == "invoices:read"
    assert (await introspect(client, ac_app, body["access_token"]))["scope"] == "invoices:read"


async def test_the_browsers_forms_refuse_a_field_given_twice(client, company, ac_app, db):
    """The consent form took the last `decision` (`decision=deny&decision=approve`
    approved), the sign-in forms the first of everything: a proxy or a log that reads
    the other saw another request. Now 400, and nothing recorded."""
    url = authorize_url(ac_app)
    page = await (await client.get(url)).text()
    csrf = hidden_fields(page)["csrf_token"]
    twice = [("email", company.admin_email), ("email", "x@acme.example"),
             ("password", company.admin_password), ("next", url), ("csrf_token", csrf)]  # fmt: skip
    login = await client.post("/oauth/login", data=twice, allow_redirects=False)
    assert login.status == 400 and "email is given more than once" in await login.text()
    await sign_in(client, company.admin_email, company.admin_password, url)
    page = await (await client.get(url)).text()
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    decided = await client.post(
        "/oauth/authorize",
        data=[
            *hidden_inputs(page, "/oauth/authorize"),
            ("decision", "deny"),
            ("decision", "approve"),
        ],
        allow_redirects=False,
    )
    assert decided.status == 400 and "decision is given more than once" in await decided.text()
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before
    assert query_of(await consent(client, url)).get("code")  # the form as sent still works


async def test_a_refresh_may_narrow_the_scope_and_later_ask_for_the_whole_grant(
    client, company, ac_app
):
    """RFC 6749 §6: a refresh asks for any part of the original grant, and an omitted scope
    means all of it, whatever the previous access token carried."""
    body = await (await exchange(client, ac_app, await code_for(client, company, ac_app))).json()
    assert body["scope"] == "debtors:read invoices:read"
    narrow = await (
        await refresh(client, ac_app, body["refresh_token"], scope="invoices:read")
    ).json()
    assert narrow["scope"] == "invoices:read"
    assert (await introspect(client, ac_app, narrow["access_token"]))["scope"] == "invoices:read"
    whole = await (await refresh(client, ac_app, narrow["refresh_token"])).json()
    assert whole["scope"] == "debtors:read invoices:read"
    named = await refresh(
        client, ac_app, whole["refresh_token"], scope="invoices:read debtors:read"
    )
    assert named.status == 200, await named.text()
    again = await named.json()
    assert set(again["scope"].split()) == {"debtors:read", "invoices:read"}
    wider = await refresh(client, ac_app, again["refresh_token"], scope="payments:read")
    assert wider.status == 400
    assert (await wider.json())["error"] == "invalid_scope"


async def test_deleting_an_application_revokes_its_tokens(client, company):
    app = await new_app(client, company)
    token = (await cc_token(client, app))["access_token"]
    ctx = client.app[CONTEXT]
    await ctx.refresh()  # issuing does not wait for the model; a lookup that misses does
    assert ctx.policy.token(bytes.fromhex(tokens.token_hash(token)), time.time()) is not None
    assert (
        await client.delete(f"/admin/applications/{app['client_id']}", headers=company.auth)
    ).status == 204
    assert ctx.policy.token(bytes.fromhex(tokens.token_hash(token)), time.time()) is None


async def test_revocation_endpoint(client, company, db):
    app = await new_app(client, company)
    other = await new_app(client, company, name="Other")
    token = (await cc_token(client, app))["access_token"]
    # another client cannot revoke it; unknown tokens get 200 too (RFC 7009 §2.2)
    for who, tok in ((other, token), (app, "tgat_nonsense")):
        response = await client.post(
            "/oauth/revoke",
            data={"token": tok},
            headers=basic(who["client_id"], who["client_secret"]),
        )
        assert response.status == 200
    assert (await introspect(client, app, token))["active"] is True
    response = await client.post(
        "/oauth/revoke",
        data={"token": token, "token_type_hint": "access_token"},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert response.status == 200
    assert await introspect(client, app, token) == {"active": False}
    unauthenticated = await client.post("/oauth/revoke", data={"token": token})
    assert unauthenticated.status == 401


async def test_introspection_by_a_resource_server_and_by_other_clients(client, company, db):
    from service.commands.directory import register_resource_server

    app = await new_app(client, company)
    other = await new_app(client, company, name="Other")
    token = (await cc_token(client, app))["access_token"]
    _, key = await register_resource_server(client.app[CONTEXT], "invoices api", Metadata())
    response = await client.post(
        "/oauth/introspect", data={"token": token}, headers={"Authorization": f"Bearer {key}"}
    )
    info = await response.json()
    assert info["active"] is True
    assert info["client_id"] == app["client_id"]
    assert "exp" not in info  # client_credentials tokens do not expire
    assert await introspect(client, other, token) == {"active": False}
    assert await introspect(client, app, "garbage") == {"active": False}
    bad = await client.post(
        "/oauth/introspect", data={"token": token}, headers={"Authorization": "Bearer tgrs_nope"}
    )
    assert bad.status == 401
    # a Bearer credential gets a Bearer challenge (RFC 7662 §2.3, RFC 6750 §3)
    assert bad.headers["WWW-Authenticate"].startswith(
        'Bearer realm="tollgate", error="invalid_token"'
    )
    assert bad.headers["Cache-Control"] == "no-store"


async def test_a_refresh_token_introspects_for_its_own_client_only(client, company, ac_app):
    from service.commands.directory import register_resource_server

    first = await (await exchange(client, ac_app, await code_for(client, company, ac_app))).json()
    live = await introspect(client, ac_app, first["refresh_token"])
    assert live["active"] is True
    assert live["token_type"] == "refresh_token"  # never to be taken for an access token
    assert live["client_id"] == ac_app["client_id"]
    assert live["scope"] == "debtors:read invoices:read"
    assert live["exp"] > time.time() + 3600
    # a resource server has no business with refresh tokens; another client neither
    _, key = await register_resource_server(client.app[CONTEXT], "billing api", Metadata())
    by_server = await client.post(
        "/oauth/introspect",
        data={"token": first["refresh_token"]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert await by_server.json() == {"active": False}
    other = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    assert await introspect(client, other, first["refresh_token"]) == {"active": False}
    # spent by a rotation, the old one is inactive and the new one live; revoked, neither
    second = await (await refresh(client, ac_app, first["refresh_token"])).json()
    assert await introspect(client, ac_app, first["refresh_token"]) == {"active": False}
    assert (await introspect(client, ac_app, second["refresh_token"]))["active"] is True
    await client.post(
        "/oauth/revoke",
        data={"token": second["refresh_token"]},
        headers=basic(ac_app["client_id"], ac_app["client_secret"]),
    )
    assert await introspect(client, ac_app, second["refresh_token"]) == {"active": False}


async def test_server_metadata(client):
    response = await client.get("/.well-known/oauth-authorization-server")
    meta = await response.json()
    assert meta["token_endpoint"] == "http://127.0.0.1:8080/oauth/token"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert "invoices:read" in meta["scopes_supported"]
    assert meta["issuer"] == "http://127.0.0.1:8080"  # where `make run` serves


async def test_the_issuer_does_not_come_from_the_host_header(client):
    """A caller must not be able to make the metadata name its own host (a cached copy
    would send other clients' credentials there)."""
    response = await client.get(
        "/.well-known/oauth-authorization-server", headers={"Host": "evil.example"}
    )
    meta = await response.json()
    assert "evil.example" not in json.dumps(meta)
    assert meta["issuer"] == "http://127.0.0.1:8080"


async def test_no_token_code_or_secret_is_stored_or_logged_in_clear(client, company, ac_app, db):
    import structlog

    from tests.e2e.test_admin_people import caught_up, everything_stored

    with structlog.testing.capture_logs() as logs:
        verifier, challenge = pkce()
        code = await code_for(client, company, ac_app, challenge=challenge)
        first = await (await exchange(client, ac_app, code, verifier)).json()
        second = await (await refresh(client, ac_app, first["refresh_token"])).json()
        await exchange(client, ac_app, code, verifier)  # reused: revokes, logs, records
        cc = await new_app(client, company, name="CC")
        cc_access = (await cc_token(client, cc))["access_token"]
        await caught_up(client)
    secrets = [
        code,
        verifier,
        first["access_token"],
        first["refresh_token"],
        second["access_token"],
        second["refresh_token"],
        ac_app["client_secret"],
        cc["client_secret"],
        cc_access,
    ]
    stored, logged = await everything_stored(db), repr(logs)
    assert "AccessTokenIssued" in stored and "TokenRefreshed" in stored
    for secret in secrets:
        assert secret not in stored
        assert secret not in logged


async def test_the_issuer_comes_from_public_url_when_set(db, settings):
    import dataclasses

    from tests.e2e.test_gateway import start

    client = await start(db, dataclasses.replace(settings), public_url="https://auth.example.com")
    try:
        meta = await (
            await client.get(
                "/.well-known/oauth-authorization-server", headers={"Host": "evil.example"}
            )
        ).json()
    finally:
        await client.close()
    assert meta["issuer"] == "https://auth.example.com"
    assert meta["token_endpoint"] == "https://auth.example.com/oauth/token"


@pytest.mark.parametrize("public_url", ["https://example.com/auth", "https://example.com"])
async def test_an_issuer_with_a_path_has_its_metadata_where_rfc_8414_puts_it(
    db, settings, public_url
):
    """RFC 8414 §3.1: for https://example.com/auth, at
    /.well-known/oauth-authorization-server/auth (oauth4webapi's discovery asks there; it
    got 404). Any other path after the well-known one is no issuer of this service."""
    from tests.e2e.test_gateway import start

    client = await start(db, dataclasses.replace(settings), public_url=public_url)
    try:
        at_path = await client.get("/.well-known/oauth-authorization-server/auth")
        other = await client.get("/.well-known/oauth-authorization-server/other")
        plain = await client.get("/.well-known/oauth-authorization-server")
        if public_url.endswith("/auth"):
            assert at_path.status == 200
            assert (await at_path.json())["issuer"] == public_url
            assert (await at_path.json())["token_endpoint"] == f"{public_url}/oauth/token"
        else:
            assert at_path.status == 404
        assert other.status == 404
        assert (await other.json())["error"] == "not_found"
        assert (await plain.json())["issuer"] == public_url
    finally:
        await client.close()


async def test_a_malformed_code_verifier_is_invalid_grant(client, company, ac_app):
    _verifier, challenge = pkce()
    code = await code_for(client, company, ac_app, challenge=challenge)
    response = await exchange(client, ac_app, code, "é" * 50)
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_grant"


async def test_a_removed_permission_does_not_come_back_to_a_client_credentials_token(
    client, company
):
    app = await new_app(
        client, company, ip_allowlist=["127.0.0.1"], permissions=["invoices:read", "debtors:read"]
    )
    token = (await cc_token(client, app))["access_token"]
    path = f"/admin/applications/{app['client_id']}"
    headers = {"Authorization": f"Bearer {token}"}
    await client.patch(path, json={"permissions": ["invoices:read"]}, headers=company.auth)
    assert (await (await client.get("/api/v1/whoami", headers=headers)).json())["permissions"] == [
        "invoices:read"
    ]
    await client.patch(
        path, json={"permissions": ["invoices:read", "debtors:read"]}, headers=company.auth
    )
    assert (await (await client.get("/api/v1/whoami", headers=headers)).json())["permissions"] == [
        "invoices:read"
    ]


# --- consent: where the browser may go after it, and what it records --------------------


def form_action(response) -> list[str]:
    for directive in response.headers["Content-Security-Policy"].split(";"):
        name, *sources = directive.split()
        if name == "form-action":
            return sources
    raise AssertionError("no form-action directive")


async def grants_in_log(db) -> int:
    return await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'ConnectionGranted'")


async def test_the_consent_page_lets_the_browser_follow_allow_and_deny_to_the_application(
    client, company, ac_app
):
    """Chromium checks form-action against the redirect after a form POST: the consent
    page names the application's origin, and keeps clickjacking protection."""
    url = authorize_url(ac_app)
    await sign_in(client, company.admin_email, company.admin_password, url)
    page = await client.get(url)
    assert page.status == 200
    assert form_action(page) == ["'self'", "https://app.example"]
    csp = page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp
    assert "default-src 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert 'name="csrf_token"' in await page.text()


async def test_the_sign_in_page_of_an_authorization_request_names_its_redirect_origin(
    client, company, ac_app
):
    """An error held back until the sign-in is a redirect at the end of the sign-in form's
    submission, so that page names the origin too, also when shown again after a typo."""
    url = authorize_url(ac_app, response_type="token")
    page = await client.get(url)
    assert 'name="password"' in await page.text()
    assert form_action(page) == ["'self'", "https://app.example"]
    csrf = (await page.text()).split('name="csrf_token" value="')[1].split('"')[0]
    again = await client.post(
        "/oauth/login",
        data={"email": company.admin_email, "password": "wrong", "next": url, "csrf_token": csrf},
    )
    assert again.status == 401
    assert form_action(again) == ["'self'", "https://app.example"]


async def test_every_other_page_keeps_form_action_self(client, company, ac_app):
    forged = authorize_url(ac_app).replace("app.example", "attacker.example")
    error = await client.get(forged)
    assert error.status == 400
    assert form_action(error) == ["'self'"]
    # A sign-in whose `next` names another redirect URI than the registered one.
    page = await client.get(authorize_url(ac_app))
    csrf = (await page.text()).split('name="csrf_token" value="')[1].split('"')[0]
    again = await client.post(
        "/oauth/login",
        data={"email": company.admin_email, "password": "x", "next": forged, "csrf_token": csrf},
    )
    assert again.status == 401
    assert form_action(again) == ["'self'"]
    assert form_action(await client.get("/dashboard")) == ["'self'"]


async def test_approving_again_records_no_second_grant(client, company, ac_app, db):
    """Allow pressed twice, a reload, a retry: a new code each time, one grant in the log."""
    url = authorize_url(ac_app)
    await sign_in(client, company.admin_email, company.admin_password, url)
    first = query_of(await consent(client, url))["code"]
    second = query_of(await consent(client, url))["code"]

    assert first != second
    assert await grants_in_log(db) == 1
    assert (
        await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'AuthorizationCodeIssued'")
        == 2
    )
    assert (await exchange(client, ac_app, second)).status == 200
    assert (await exchange(client, ac_app, first)).status == 200


async def test_approving_other_permissions_or_after_a_revocation_records_a_grant(
    client, company, ac_app, db
):
    url = authorize_url(ac_app)
    await sign_in(client, company.admin_email, company.admin_password, url)
    await consent(client, url)
    # a narrower consent adds nothing to the connection, and takes nothing from it
    await consent(client, authorize_url(ac_app, scope="invoices:read"))
    assert await grants_in_log(db) == 1
    connections = await (await client.get("/admin/connections", headers=company.auth)).json()
    assert connections["connections"][0]["permissions"] == sorted(ac_app["permissions"])

    revoked = await client.delete(f"/admin/connections/{ac_app['client_id']}", headers=company.auth)
    assert revoked.status == 204
    code = query_of(await consent(client, authorize_url(ac_app, scope="invoices:read")))["code"]
    assert await grants_in_log(db) == 2
    assert (await exchange(client, ac_app, code)).status == 200


async def test_a_consent_on_a_stale_view_of_a_revoked_connection_records_the_grant(
    client, company, ac_app, db
):
    """Another process may not have seen a revocation yet: its code goes in only while the
    connection is as that process saw it, else the grant is recorded after all."""
    url = authorize_url(ac_app)
    await sign_in(client, company.admin_email, company.admin_password, url)
    await consent(client, url)
    ctx = client.app[CONTEXT]
    key = (company.company_id, ac_app["client_id"])
    seen = ctx.policy.connections[key]
    revoked = await client.delete(f"/admin/connections/{ac_app['client_id']}", headers=company.auth)
    assert revoked.status == 204
    ctx.policy.connections[key] = seen  # as a process that has not applied the revocation

    code = query_of(await consent(client, url))["code"]

    assert await grants_in_log(db) == 2
    response = await exchange(client, ac_app, code)
    assert response.status == 200, await response.text()


async def test_a_request_may_leave_out_the_one_registered_redirect_uri(client, company, ac_app):
    """RFC 6749 §3.1.2.3: with one registered redirect URI the authorization request may
    leave it out, and then the token request need not name it (§4.1.3); one that names it
    must name the registered one. A code asked for with it needs it at the token endpoint."""
    from urllib.parse import urlencode

    without = "/oauth/authorize?" + urlencode(
        {"response_type": "code", "client_id": ac_app["client_id"], "state": "s1"}
    )
    await sign_in(client, company.admin_email, company.admin_password, without)
    codes = []
    for _ in range(3):
        location = await consent(client, without)
        assert location.startswith(ac_app["redirect_uri"] + "&"), location
        codes.append(query_of(location)["code"])
    plain = await client.post(
        "/oauth/token", data={"grant_type": "authorization_code", "code": codes[0]},
        headers=basic(ac_app["client_id"], ac_app["client_secret"]),
    )  # fmt: skip
    assert plain.status == 200, await plain.text()
    named = await exchange(client, ac_app, codes[1])  # the registered one: still accepted
    assert named.status == 200, await named.text()
    other = await exchange(client, ac_app, codes[2], redirect_uri="https://app.example/other")
    assert other.status == 400
    assert (await other.json())["error"] == "invalid_grant"
    # asked for with the redirect URI: the token request must name it
    code = query_of(await consent(client, authorize_url(ac_app)))["code"]  # signed in already
    missing = await client.post(
        "/oauth/token", data={"grant_type": "authorization_code", "code": code},
        headers=basic(ac_app["client_id"], ac_app["client_secret"]),
    )  # fmt: skip
    assert missing.status == 400
    assert (await missing.json())["error"] == "invalid_request"
    assert "redirect_uri is required" in (await missing.json())["error_description"]
    assert (await exchange(client, ac_app, code)).status == 200  # not spent by the refusal


async def test_a_native_apps_loopback_redirect_uri_cannot_be_left_out(client, company):
    """RFC 8252 §7.3: the port is the one the app listens on, which only the request says."""
    from urllib.parse import urlencode

    from tests.e2e.test_native_apps import public_app

    app = await public_app(client, company)
    _verifier, challenge = pkce()
    url = "/oauth/authorize?" + urlencode({
        "response_type": "code", "client_id": app["client_id"], "state": "s",
        "code_challenge": challenge, "code_challenge_method": "S256",
    })  # fmt: skip
    shown = await client.get(url, allow_redirects=False)
    assert shown.status == 400
    assert "redirect_uri is missing" in await shown.text()


async def test_revocations_of_many_tokens_at_once_are_counted(
    client, company, other_company, ac_app
):
    """tollgate_token_revocations_total counted TokenRevoked alone: the kill switch,
    an application's deletion and a connection's revocation, which end every token they
    cover with one event, left every series where it was."""
    from prometheus_client.parser import text_string_to_metric_families

    async def revocations() -> dict[str, float]:
        text = await (await client.get("/metrics")).text()
        [family] = [f for f in text_string_to_metric_families(text)
                    if f.name == "tollgate_token_revocations"]  # fmt: skip
        return {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}

    before = await revocations()
    app = await new_app(client, company)
    await cc_token(client, app)
    path = f"/admin/applications/{app['client_id']}"
    assert (await client.post(f"{path}/revoke-tokens", headers=company.auth)).status == 200
    assert (await client.delete(path, headers=company.auth)).status == 204
    await exchange(client, ac_app, await code_for(client, other_company, ac_app))
    revoked = await client.delete(
        f"/admin/connections/{ac_app['client_id']}", headers=other_company.auth
    )
    assert revoked.status == 204
    after = await revocations()
    moved = {reason: after[reason] - before.get(reason, 0) for reason in after}
    assert {r: n for r, n in moved.items() if n} == {
        "kill_switch": 1, "application_deleted": 1, "connection_revoked": 1,
    }  # fmt: skip
