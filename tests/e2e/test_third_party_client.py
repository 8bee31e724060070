"""The flows driven by a real third-party OAuth client library (Authlib's httpx client):
client_credentials, authorization_code with PKCE, refresh, revocation."""

from __future__ import annotations

from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client

from tests.e2e.oauth_helpers import consent, new_app, sign_in


def base_url(client) -> str:
    return str(client.make_url("")).rstrip("/")


async def test_authlib_client_credentials(client, company):
    app = await new_app(client, company)
    base = base_url(client)
    async with AsyncOAuth2Client(app["client_id"], app["client_secret"]) as oauth:
        token = await oauth.fetch_token(f"{base}/oauth/token", grant_type="client_credentials")
        assert token["token_type"] == "Bearer"
        assert "refresh_token" not in token
        assert "expires_in" not in token
        whoami = await oauth.post(
            f"{base}/oauth/introspect",
            data={"token": token["access_token"]},
            auth=(app["client_id"], app["client_secret"]),
        )
        assert whoami.json()["active"] is True


async def test_authlib_authorization_code_with_pkce_refresh_and_revoke(client, company):
    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    base = base_url(client)
    verifier = generate_token(48)
    async with AsyncOAuth2Client(
        app["client_id"],
        app["client_secret"],
        redirect_uri=app["redirect_uri"],
        scope="invoices:read",
        code_challenge_method="S256",
    ) as oauth:
        url, state = oauth.create_authorization_url(
            f"{base}/oauth/authorize", code_verifier=verifier
        )
        path = url[len(base) :]
        await sign_in(client, company.admin_email, company.admin_password, path)
        location = await consent(client, path)
        token = await oauth.fetch_token(
            f"{base}/oauth/token", authorization_response=location, code_verifier=verifier
        )
        assert token["scope"] == "invoices:read"
        assert token["expires_in"] == 7200
        renewed = await oauth.refresh_token(
            f"{base}/oauth/token", refresh_token=token["refresh_token"]
        )
        assert renewed["access_token"] != token["access_token"]
        assert renewed["refresh_token"] != token["refresh_token"]
        revoked = await oauth.revoke_token(
            f"{base}/oauth/revoke", token=renewed["refresh_token"], token_type_hint="refresh_token"
        )
        assert revoked.status_code == 200
        again = await oauth.post(
            f"{base}/oauth/introspect",
            data={"token": renewed["access_token"]},
            auth=(app["client_id"], app["client_secret"]),
        )
        assert again.json() == {"active": False}
        del state
