"""Public clients for native apps over HTTP (RFC 8252): token_endpoint_auth_method "none"
for authorization_code applications only, PKCE on every authorization request, loopback IP
redirect URIs that match with any port, refresh-token rotation as for every client, and
no client_credentials, secrets or introspection for them."""

from __future__ import annotations

import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client

from tests.e2e.oauth_helpers import (
    authorize_url,
    basic,
    consent,
    new_app,
    pkce,
    query_of,
    sign_in,
)

LOOPBACK = "http://127.0.0.1/callback"


async def public_app(client, company, redirect_uri=LOOPBACK, **fields) -> dict:
    return await new_app(
        client,
        company,
        grant_type="authorization_code",
        ip_allowlist=[],
        redirect_uri=redirect_uri,
        token_endpoint_auth_method="none",
        **fields,
    )


async def code_at(client, company, app, redirect_uri, challenge, *, signed_in=False) -> str:
    url = authorize_url(app | {"redirect_uri": redirect_uri}, challenge=challenge)
    if not signed_in:
        await sign_in(client, company.admin_email, company.admin_password, url)
    location = await consent(client, url)
    assert location.startswith(redirect_uri + "?"), location
    return query_of(location)["code"]


async def exchange(client, app, code, verifier, redirect_uri):
    return await client.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "client_id": app["client_id"],
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        },
    )


async def test_a_public_client_gets_and_refreshes_tokens_with_its_client_id_alone(client, company):
    app = await public_app(client, company)
    assert "client_secret" not in app
    assert app["token_endpoint_auth_method"] == "none"
    verifier, challenge = pkce()
    redirect = "http://127.0.0.1:53682/callback"  # the port the app happened to get
    code = await code_at(client, company, app, redirect, challenge)
    answer = await exchange(client, app, code, verifier, redirect)
    assert answer.status == 200, await answer.text()
    token = await answer.json()
    assert token["expires_in"] == 7200 and token["refresh_token"]
    refreshed = await client.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "client_id": app["client_id"],
            "refresh_token": token["refresh_token"],
        },
    )
    assert refreshed.status == 200
    renewed = await refreshed.json()
    assert renewed["refresh_token"] != token["refresh_token"]  # rotated
    whoami = await client.get(
        "/api/v1/whoami", headers={"Authorization": f"Bearer {renewed['access_token']}"}
    )
    assert whoami.status == 200
    # RFC 7009 §2.1: a public client revokes with its client_id
    revoked = await client.post(
        "/oauth/revoke", data={"client_id": app["client_id"], "token": renewed["refresh_token"]}
    )
    assert revoked.status == 200
    # introspection asks for authentication, which a public client does not have
    looked = await client.post(
        "/oauth/introspect", data={"client_id": app["client_id"], "token": token["access_token"]}
    )
    assert looked.status == 400
    assert (await looked.json())["error"] == "invalid_client"


async def test_a_public_client_may_name_itself_in_basic_with_an_empty_password(client, company):
    """Go's oauth2 (AuthStyleInHeader) sends a client_id alone as Basic "client_id:"; a
    public client's refresh and revocation take it as the client_id in the body. A wrong
    password still is one."""
    app = await public_app(client, company)
    verifier, challenge = pkce()
    redirect = "http://127.0.0.1:53682/callback"
    code = await code_at(client, company, app, redirect, challenge)
    token = await (await exchange(client, app, code, verifier, redirect)).json()
    as_go = basic(app["client_id"], "")
    refreshed = await client.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]},
        headers=as_go,
    )
    assert refreshed.status == 200, await refreshed.text()
    renewed = await refreshed.json()
    # Named so, it is still a public client: introspection needs authentication it has not.
    # Before, Basic "client_id:" passed where the client_id in the body was refused.
    looked = await client.post(
        "/oauth/introspect", data={"token": renewed["access_token"]}, headers=as_go
    )
    assert looked.status == 401 and (await looked.json())["error"] == "invalid_client"
    revoked = await client.post(
        "/oauth/revoke", data={"token": renewed["refresh_token"]}, headers=as_go
    )
    assert revoked.status == 200
    guessed = await client.post(
        "/oauth/revoke", data={"token": renewed["access_token"]},
        headers=basic(app["client_id"], "a guess"),
    )  # fmt: skip
    assert guessed.status == 401


async def test_authlib_as_a_native_app(client, company):
    app = await public_app(client, company, redirect_uri="http://[::1]/cb")
    base = str(client.make_url("")).rstrip("/")
    redirect = "http://[::1]:8123/cb"
    async with AsyncOAuth2Client(
        app["client_id"],
        redirect_uri=redirect,
        token_endpoint_auth_method="none",
        code_challenge_method="S256",
    ) as oauth:
        verifier = pkce()[0]
        url, _ = oauth.create_authorization_url(f"{base}/oauth/authorize", code_verifier=verifier)
        path = url[len(base) :]
        await sign_in(client, company.admin_email, company.admin_password, path)
        location = await consent(client, path)
        assert location.startswith(redirect + "?")
        token = await oauth.fetch_token(
            f"{base}/oauth/token", authorization_response=location, code_verifier=verifier
        )
        assert token["token_type"] == "Bearer"
        renewed = await oauth.refresh_token(
            f"{base}/oauth/token", refresh_token=token["refresh_token"]
        )
        assert renewed["access_token"] != token["access_token"]


async def test_pkce_is_required_of_a_public_client(client, company):
    app = await public_app(client, company)
    url = authorize_url(app)  # no code_challenge
    await sign_in(client, company.admin_email, company.admin_password, url)
    response = await client.get(url, allow_redirects=False)
    assert response.status == 302
    query = query_of(response.headers["Location"])
    assert response.headers["Location"].startswith(LOOPBACK + "?")
    assert query["error"] == "invalid_request"
    assert "code_challenge" in query["error_description"]
    # and the token endpoint wants the verifier that goes with the challenge
    _, challenge = pkce()
    code = await code_at(client, company, app, LOOPBACK, challenge, signed_in=True)
    missing = await exchange(client, app, code, "", LOOPBACK)
    assert missing.status == 400
    assert (await missing.json())["error"] == "invalid_grant"


@pytest.mark.parametrize(
    "presented",
    [
        "http://127.0.0.1:8080/other",  # another path
        "http://127.0.0.1:8080/callback?x=1",  # another query
        "http://127.0.0.2:8080/callback",  # another address
        "http://localhost:8080/callback",  # a name, not the registered IP literal
        "https://127.0.0.1:8080/callback",  # another scheme
        "http://127.0.0.1:8080@evil.example/callback",  # userinfo hiding another host
        "http://evil.example#@127.0.0.1:8080/callback",
        "http://127.0.0.1:99999/callback",  # not a port
        "http://127.0.0.1:0x50/callback",
    ],
)
async def test_only_the_port_of_a_loopback_redirect_uri_may_differ(client, company, presented):
    app = await public_app(client, company)
    url = authorize_url(app | {"redirect_uri": presented}, challenge=pkce()[1])
    response = await client.get(url, allow_redirects=False)
    assert response.status == 400  # an error page, never a redirect there
    assert "Location" not in response.headers


async def test_a_confidential_clients_loopback_redirect_uri_is_matched_exactly(client, company):
    app = await new_app(
        client, company, grant_type="authorization_code", ip_allowlist=[], redirect_uri=LOOPBACK
    )
    url = authorize_url(app | {"redirect_uri": "http://127.0.0.1:8080/callback"})
    assert (await client.get(url, allow_redirects=False)).status == 400


async def test_a_public_client_is_for_users_grants_only(client, company):
    response = await client.post(
        "/admin/applications",
        json={
            "name": "Sync",
            "grant_type": "client_credentials",
            "ip_allowlist": ["127.0.0.1"],
            "permissions": ["invoices:read"],
            "notification_emails": ["ops@acme.example"],
            "token_endpoint_auth_method": "none",
        },
        headers=company.auth,
    )
    assert response.status == 400
    assert "authorization_code applications only" in (await response.json())["error_description"]
    cc = await new_app(client, company)
    patched = await client.patch(
        f"/admin/applications/{cc['client_id']}",
        json={"token_endpoint_auth_method": "none"},
        headers=company.auth,
    )
    assert patched.status == 400
    # nor can a client_credentials token be had with a client_id alone
    refused = await client.post(
        "/oauth/token", data={"grant_type": "client_credentials", "client_id": cc["client_id"]}
    )
    assert refused.status == 400
    assert (await refused.json())["error"] == "invalid_client"


async def test_secrets_do_not_mix_with_public_clients(client, company):
    public = await public_app(client, company)
    rotated = await client.post(
        f"/admin/applications/{public['client_id']}/rotate-secret", headers=company.auth
    )
    assert rotated.status == 400
    confidential = await new_app(
        client, company, grant_type="authorization_code", ip_allowlist=[], redirect_uri=LOOPBACK
    )
    verifier, challenge = pkce()
    code = await code_at(client, company, confidential, LOOPBACK, challenge)
    # a confidential client's code is not redeemed with its client_id alone
    refused = await exchange(client, confidential, code, verifier, LOOPBACK)
    assert refused.status == 400
    assert (await refused.json())["error"] == "invalid_client"
    # a public client sending a secret (any secret) is refused
    code = await code_at(client, company, public, LOOPBACK, challenge, signed_in=True)
    response = await client.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": LOOPBACK,
            "code_verifier": verifier,
        },
        headers=basic(public["client_id"], "guessed"),
    )
    assert response.status == 401
    assert "public client" in (await response.json())["error_description"]
