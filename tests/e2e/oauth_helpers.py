"""Shared steps of the OAuth tests: applications, Basic credentials, the browser part."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
from urllib.parse import parse_qs, quote_plus, urlsplit

from tests.conftest import Company

REDIRECT = "https://app.example/callback?provider=tollgate"


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
    return verifier, challenge


async def new_app(client, company: Company, **fields) -> dict:
    body = {
        "name": "Test app",
        "grant_type": "client_credentials",
        "ip_allowlist": ["127.0.0.1"],
        "permissions": ["invoices:read", "debtors:read"],
        "notification_emails": ["ops@acme.example"],
    } | fields
    if body["grant_type"] == "authorization_code":
        body.setdefault("redirect_uri", REDIRECT)
    response = await client.post("/admin/applications", json=body, headers=company.auth)
    assert response.status == 201, await response.text()
    return await response.json()


async def cc_token(client, app: dict, **extra) -> dict:
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", **extra},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert response.status == 200, await response.text()
    return await response.json()


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def sign_in(client, email: str, password: str, next_url: str) -> list[str]:
    """The login form, as a browser submits it."""
    page = await client.get(next_url)
    assert page.status == 200
    text = await page.text()
    assert 'name="password"' in text
    csrf = text.split('name="csrf_token" value="')[1].split('"')[0]
    response = await client.post(
        "/oauth/login",
        data={"email": email, "password": password, "next": next_url, "csrf_token": csrf},
        allow_redirects=False,
    )
    assert response.status == 303, await response.text()
    # back to the authorization request it came from (the client may re-quote the URL)
    location = response.headers["Location"]
    assert location.startswith("/oauth/authorize?")
    assert query_of(location) == query_of(next_url)
    return response.headers.getall("Set-Cookie")


async def consent(client, authorize_url: str, decision: str = "approve") -> str:
    """Open the consent page and answer it; returns the redirect Location."""
    page = await client.get(authorize_url)
    assert page.status == 200, await page.text()
    text = await page.text()
    assert "Allow" in text
    response = await client.post(
        "/oauth/authorize", data=hidden_fields(text) | {"decision": decision}, allow_redirects=False
    )
    assert response.status == 302, await response.text()
    return response.headers["Location"]


def hidden_inputs(page: str, action: str | None = None) -> list[tuple[str, str]]:
    """The hidden inputs (name, value) of the page, or of its form that posts to `action`,
    in order, as a browser sends them."""
    if action is not None:
        page = page.split(f'action="{action}"', 1)[1].split("</form>", 1)[0]
    inputs = [tag for tag in re.findall(r"<input[^>]*>", page) if 'type="hidden"' in tag]
    return [(_attribute(tag, "name"), _attribute(tag, "value")) for tag in inputs]


def hidden_fields(page: str, action: str | None = None) -> dict[str, str]:
    return dict(hidden_inputs(page, action))


def _attribute(tag: str, name: str) -> str:
    found = re.search(f'{name}="([^"]*)"', tag)
    assert found, tag
    return html.unescape(found[1])


def authorize_url(
    app: dict,
    *,
    state: str = "xyz",
    challenge: str | None = None,
    scope: str | None = None,
    **extra,
) -> str:
    from urllib.parse import urlencode

    params = {
        "response_type": "code",
        "client_id": app["client_id"],
        "redirect_uri": app["redirect_uri"],
        "state": state,
    }
    if challenge:
        params |= {"code_challenge": challenge, "code_challenge_method": "S256"}
    if scope:
        params["scope"] = scope
    return "/oauth/authorize?" + urlencode(params | extra)


async def code_for(client, company: Company, app: dict, **kw) -> str:
    url = authorize_url(app, **kw)
    await sign_in(client, company.admin_email, company.admin_password, url)
    location = await consent(client, url)
    assert location.startswith(app["redirect_uri"] + "&")
    return query_of(location)["code"]
