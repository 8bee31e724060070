"""Consent that cannot be phished or silently narrowed: the page names the publisher and
where the answer goes; a later, narrower consent by another user keeps the grant given; only
an admin adds a permission other than `:read`; "Not you?" signs out and comes back."""

from __future__ import annotations

import html

import pytest

from service.domain import credentials
from tests.e2e.lifecycle_helpers import add_user
from tests.e2e.oauth_helpers import (
    authorize_url,
    basic,
    consent,
    hidden_fields,
    hidden_inputs,
    new_app,
    query_of,
    sign_in,
)
from tests.e2e.test_oauth_flows import exchange

BOTH = "invoices:read invoices:write"


async def web_app(client, company, **fields) -> dict:
    return await new_app(client, company, grant_type="authorization_code",
                         permissions=["invoices:read", "invoices:write"], **fields)  # fmt: skip


async def signed_in_page(client, email: str, password: str, url: str) -> str:
    client.session.cookie_jar.clear()
    await sign_in(client, email, password, url)
    page = await client.get(url)
    assert page.status == 200
    return html.unescape(await page.text())


async def test_the_page_names_the_publishing_company_and_the_redirect_host(
    client, company, other_company
):
    theirs = await new_app(client, other_company, grant_type="authorization_code",
                           name="Acme Payroll")  # fmt: skip
    page = await signed_in_page(client, company.admin_email, company.admin_password,
                                authorize_url(theirs))  # fmt: skip
    assert "Published by Globex" in page and "another company" in page
    assert "Your answer takes you to <strong>app.example</strong>" in page
    ours = await new_app(client, company, grant_type="authorization_code", name="Acme Payroll")
    own_page = html.unescape(await (await client.get(authorize_url(ours))).text())
    assert "Published by your company, Acme." in own_page
    assert "another company" not in own_page
    assert 'href="/dashboard"' in own_page and "Connections page" in own_page


async def test_a_members_narrower_consent_keeps_the_admins_grant(client, company):
    app = await web_app(client, company)
    member = await add_user(client, company.auth, "clerk@acme.example", "member")
    both = authorize_url(app, scope=BOTH)
    client.session.cookie_jar.clear()
    await sign_in(client, company.admin_email, company.admin_password, both)
    admin_tokens = await (
        await exchange(client, app, query_of(await consent(client, both))["code"])
    ).json()
    assert admin_tokens["scope"] == BOTH
    read = authorize_url(app, scope="invoices:read")
    client.session.cookie_jar.clear()
    await sign_in(client, "clerk@acme.example", member["password"], read)
    member_tokens = await (
        await exchange(client, app, query_of(await consent(client, read))["code"])
    ).json()
    assert member_tokens["scope"] == "invoices:read"
    refreshed = await client.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": admin_tokens["refresh_token"]},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert refreshed.status == 200, await refreshed.text()
    assert (await refreshed.json())["scope"] == BOTH  # the live token and its refresh agree
    connections = await (await client.get("/admin/connections", headers=company.auth)).json()
    [connection] = connections["connections"]
    assert connection["permissions"] == ["invoices:read", "invoices:write"]


async def test_only_an_admin_may_add_a_write_permission(client, company, db):
    app = await web_app(client, company)
    member = await add_user(client, company.auth, "clerk@acme.example", "member")
    both = authorize_url(app, scope=BOTH)
    page = await signed_in_page(client, "clerk@acme.example", member["password"], both)
    assert "Only an admin of Acme can allow invoices:write" in page
    assert 'value="approve"' not in page
    fields = {k: html.unescape(v) for k, v in query_of(both).items() if k != "response_type"}
    token = page.split('name="csrf_token" value="')[1].split('"')[0]
    forged = await client.post("/oauth/authorize", allow_redirects=False,
                               data=fields | {"csrf_token": token, "decision": "approve"})  # fmt: skip
    assert forged.status == 403
    assert "only a company admin can allow invoices:write" in await forged.text()
    granted = "SELECT count(*) FROM events WHERE type = 'ConnectionGranted'"
    assert await db.pool.fetchval(granted) == 0
    # once an admin has allowed it, a member's consent may include it
    client.session.cookie_jar.clear()
    await sign_in(client, company.admin_email, company.admin_password, both)
    await consent(client, both)
    client.session.cookie_jar.clear()
    await sign_in(client, "clerk@acme.example", member["password"], both)
    code = query_of(await consent(client, both))["code"]
    assert (await (await exchange(client, app, code)).json())["scope"] == BOTH


async def test_a_redirect_host_in_other_scripts_is_also_named_as_the_browser_resolves_it(
    client, company, other_company
):
    """A look-alike of a well-known name (apple.com with a Cyrillic a, U+0430) is shown with
    its ASCII form, which no one takes for apple.com."""
    theirs = await new_app(client, other_company, grant_type="authorization_code",
                           redirect_uri="https://\u0430pple.com/cb")  # fmt: skip
    page = await signed_in_page(client, company.admin_email, company.admin_password,
                                authorize_url(theirs))  # fmt: skip
    assert "takes you to <strong>\u0430pple.com (xn--pple-43d.com)</strong>" in page


async def test_not_you_signs_out_and_returns_to_the_same_request(client, company, db):
    app = await web_app(client, company)
    url = authorize_url(app, scope="invoices:read")
    page = await signed_in_page(client, company.admin_email, company.admin_password, url)
    fields = hidden_fields(page, "/oauth/switch-user")
    assert await db.pool.fetchval("SELECT count(*) FROM web_sessions") == 1
    response = await client.post("/oauth/switch-user", data=fields, allow_redirects=False)
    assert response.status == 303
    assert query_of(response.headers["Location"]) == query_of(url)
    assert await db.pool.fetchval("SELECT count(*) FROM web_sessions") == 0
    again = await client.get(response.headers["Location"])
    assert 'name="password"' in await again.text()  # the sign-in form, for someone else
    forged = await client.post("/oauth/switch-user", data=fields | {"csrf_token": "x" * 64})
    assert forged.status == 403


@pytest.mark.parametrize("field", ["scope", "redirect_uri", "state"])
async def test_a_consent_form_with_a_field_given_twice_is_refused(client, company, db, field):
    """RFC 6749 §3.1: a parameter appears once. The consent form hands the authorization
    request on as hidden fields; one given twice (a tampered form) is refused as the GET
    refuses it, not read as its last value."""
    app = await web_app(client, company)
    url = authorize_url(app, scope="invoices:read")
    page = await signed_in_page(client, company.admin_email, company.admin_password, url)
    fields = hidden_inputs(page, "/oauth/authorize")
    fields = [(k, v) for k, v in fields if k != "decision"]
    extra = {"scope": "invoices:write", "redirect_uri": "https://evil.example/cb", "state": "x"}
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    response = await client.post(
        "/oauth/authorize",
        data=[*fields, (field, extra[field]), ("decision", "approve")],
        allow_redirects=False,
    )
    if field == "redirect_uri":  # where to send the error is what is in doubt: shown here
        assert response.status == 400, await response.text()
        assert "given more than once" in await response.text()
    else:  # back to the application's registered URI, with no code (RFC 6749 §4.1.2.1)
        assert response.status == 302, await response.text()
        location = response.headers["Location"]
        assert location.startswith(app["redirect_uri"])
        back = query_of(location)
        assert back["error"] == "invalid_request"
        assert "given more than once" in back["error_description"]
        assert "code" not in back
        assert "state" not in back or field != "state"  # which of two states is it?
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before


async def test_not_you_without_a_session_is_refused(client, company):
    """Another site's post carries no session cookie; the token expected of it would be
    the same for everyone (derived from an empty cookie): refused, nothing cleared."""
    client.session.cookie_jar.clear()
    response = await client.post(
        "/oauth/switch-user",
        data={"csrf_token": consent_token_for(""), "next": "/oauth/authorize?client_id=x"},
        allow_redirects=False,
    )
    assert response.status == 403
    assert "Set-Cookie" not in response.headers


def consent_token_for(session_cookie: str) -> str:
    """The consent form's token as the service derives it from a session cookie."""
    return credentials.digest("consent:" + session_cookie)


async def test_an_authorization_request_with_a_parameter_twice_goes_back_to_the_client(
    client, company
):
    """RFC 6749 §4.1.2.1: once the client and its redirect URI are known, an invalid
    request is the application's to hear, with `iss`; a page here said so to the user
    instead. The client and the redirect URI given twice are still shown here."""
    app = await web_app(client, company)
    url = authorize_url(app, scope="invoices:read")
    await sign_in(client, company.admin_email, company.admin_password, url)
    for extra, state in (("&state=other", None), ("&scope=invoices:write", "xyz")):
        response = await client.get(url + extra, allow_redirects=False)
        assert response.status == 302, await response.text()
        back = query_of(response.headers["Location"])
        assert back["error"] == "invalid_request"
        assert "given more than once" in back["error_description"]
        assert back.get("state") == state  # two states: which is the client's?
        assert "iss" in back  # RFC 9207
    for extra in ("&client_id=other", "&redirect_uri=https://evil.example/cb"):
        shown = await client.get(url + extra, allow_redirects=False)
        assert shown.status == 400
        assert "given more than once" in await shown.text()
