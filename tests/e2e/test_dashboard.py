"""GET /dashboard for company admins (sign-in, CSRF, members refused, one company's data
only, escaping) and the SQL views for teams that build their own dashboards."""

from __future__ import annotations

import html
import json
import re

import markupsafe

from service.audit.history import CHANGE_TYPES
from tests.conftest import Company, make_company
from tests.e2e.oauth_helpers import basic, cc_token, new_app
from tests.e2e.test_admin_people import caught_up
from tests.e2e.test_gateway import bearer, from_address


def hidden(text: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', text)
    assert match, text
    return html.unescape(match.group(1))


async def sign_in(client, email: str, password: str) -> None:
    """The dashboard's login form, as a browser submits it."""
    page = await client.get("/dashboard")
    assert page.status == 200
    text = await page.text()
    assert 'action="/dashboard/login"' in text
    response = await client.post(
        "/dashboard/login",
        data={"email": email, "password": password, "csrf_token": hidden(text, "csrf_token")},
        allow_redirects=False,
    )
    assert response.status == 303, await response.text()
    assert response.headers["Location"] == "/dashboard"


async def dashboard(client) -> str:
    await caught_up(client)  # the page reads the SQL read models
    response = await client.get("/dashboard")
    assert response.status == 200, await response.text()
    assert response.content_type == "text/html"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-store"
    return await response.text()


def row_of(text: str, needle: str) -> str:
    [row] = [r.split("</tr>")[0] for r in text.split("<tr>")[1:] if needle in r]
    return row


async def violation_from_outside(client, company: Company) -> tuple[dict, dict]:
    """Two applications; three tokens for one, one of them used from 127.0.0.2 (revoked),
    and a token request from 127.0.0.2 (refused, nothing to revoke)."""
    sync = await new_app(client, company, name="Billing sync", ip_allowlist=["127.0.0.1/32"])
    web = await new_app(
        client, company, name="Web portal", grant_type="authorization_code", ip_allowlist=[]
    )
    tokens = [(await cc_token(client, sync))["access_token"] for _ in range(3)]
    async with from_address(client, "127.0.0.2") as outsider:
        response = await outsider.get("/api/v1/whoami", headers=bearer(tokens[0]))
        assert response.status == 403
        response = await outsider.post(
            "/oauth/token",
            data={"grant_type": "client_credentials"},
            headers=basic(sync["client_id"], sync["client_secret"]),
        )
        assert response.status == 403
    return sync, web


async def test_without_a_session_the_dashboard_is_a_login_form(client):
    response = await client.get("/dashboard")
    assert response.status == 200
    text = await response.text()
    assert "<h1>Sign in</h1>" in text
    assert 'type="password"' in text
    assert response.cookies["tg_dashboard_csrf"].value == hidden(text, "csrf_token")
    assert response.cookies["tg_dashboard_csrf"]["httponly"]
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


async def test_login_needs_the_csrf_cookie_and_the_right_password(client, company):
    page = await (await client.get("/dashboard")).text()
    token = hidden(page, "csrf_token")
    creds = {"email": company.admin_email, "password": company.admin_password}
    forged = await client.post(
        "/dashboard/login", data=creds | {"csrf_token": "x" * 32}, allow_redirects=False
    )
    assert forged.status == 403
    assert "tg_session" not in forged.cookies
    wrong = await client.post(
        "/dashboard/login",
        data=creds | {"password": "not the password", "csrf_token": token},
        allow_redirects=False,
    )
    assert wrong.status == 401
    assert "Wrong email or password." in await wrong.text()
    assert "tg_session" not in wrong.cookies
    client.session.cookie_jar.clear()
    no_cookie = await client.post(
        "/dashboard/login", data=creds | {"csrf_token": token}, allow_redirects=False
    )
    assert no_cookie.status == 403
    assert "tg_session" not in no_cookie.cookies


async def test_a_failed_sign_in_reloaded_is_a_page_not_an_error(client):
    """A wrong password leaves the form's target in the address bar; Enter there is a GET."""
    again = await client.get("/dashboard/login", allow_redirects=False)
    assert again.status == 303 and again.headers["Location"] == "/dashboard"
    consent = await client.get("/oauth/login")
    assert consent.status == 200 and consent.content_type == "text/html"
    assert "go back to it and start again" in await consent.text()


async def test_signing_in_again_ends_the_session_the_browser_held(client, company, db):
    """A new sign-in overwrites the session cookie; the session it named ends too, rather
    than staying usable for its hours left by whoever copied the cookie."""
    from service.domain import credentials
    from tests.e2e.lifecycle_helpers import sign_in as api_sign_in

    first = await api_sign_in(client, company.admin_email, company.admin_password)
    again = await client.post(
        "/session",
        json={"email": company.admin_email, "password": company.admin_password},
        headers={"Cookie": f"tg_session={first.cookie}"},
    )
    assert again.status == 200
    second = again.cookies["tg_session"].value
    assert second != first.cookie
    kept = await db.pool.fetch("SELECT session_hash FROM web_sessions")
    assert [r["session_hash"] for r in kept] == [credentials.digest(second)]
    # the dashboard's own form too
    await sign_in_again(client, company)
    assert await db.pool.fetchval("SELECT count(*) FROM web_sessions") == 1
    # each opened with the version of the password that opened it (auth.signed_in)
    assert await db.pool.fetchval("SELECT user_version FROM web_sessions") is not None


async def sign_in_again(client, company) -> None:
    """The dashboard's form posted by a browser that holds a session already."""
    held = client.session.cookie_jar.filter_cookies(client.make_url("/"))["tg_session"].value
    client.session.cookie_jar.clear()
    page = await client.get("/dashboard")
    token = hidden(await page.text(), "csrf_token")
    client.session.cookie_jar.update_cookies({"tg_session": held})
    response = await client.post(
        "/dashboard/login",
        data={"email": company.admin_email, "password": company.admin_password,
              "csrf_token": token},
        allow_redirects=False,
    )  # fmt: skip
    assert response.status == 303, await response.text()


async def test_members_get_a_403_page(client, company):
    made = await client.post(
        "/admin/users",
        json={"email": "clerk@acme.example", "role": "member"},
        headers=company.auth,
    )
    member = await made.json()
    await sign_in(client, "clerk@acme.example", member["password"])
    response = await client.get("/dashboard")
    assert response.status == 403
    text = await response.text()
    assert "Only company admins" in text
    assert "Billing" not in text and "<table" not in text
    # the way out, for whoever is the admin of this browser: signing out, with the token
    assert 'action="/dashboard/logout"' in text
    out = await client.post(
        "/dashboard/logout", data={"csrf_token": hidden(text, "csrf_token")}, allow_redirects=False
    )
    assert out.status == 303
    assert "<h1>Sign in</h1>" in await (await client.get("/dashboard")).text()


async def test_the_dashboard_shows_the_companys_applications_tokens_violations_and_changes(
    client, company, db
):
    other = await make_company(client, "Globex")
    theirs = await new_app(client, other, name="Globex secret project")
    await cc_token(client, theirs)
    sync, web = await violation_from_outside(client, company)
    response = await client.patch(
        f"/admin/applications/{web['client_id']}",
        json={"name": "Customer portal"},
        headers=company.auth,
    )
    assert response.status == 200
    await sign_in(client, company.admin_email, company.admin_password)
    text = await dashboard(client)

    assert "<h1>Acme</h1>" in text
    assert f"Signed in as {company.admin_email}" in text
    # applications: name, grant type, allow list, permissions, live tokens
    row = row_of(text, sync["client_id"])
    assert "Billing sync" in row and "client_credentials" in row
    assert "<code>127.0.0.1</code>" in row  # as the application stores it
    assert "<code>invoices:read</code>" in row and "<code>debtors:read</code>" in row
    assert row.endswith('<td class="number">2</td>')  # 3 issued, 1 revoked
    row = row_of(text, web["client_id"])
    assert "Customer portal" in row and "authorization_code" in row
    assert '<td class="number">0</td>' in row
    # violations: the gateway one (token revoked) and the token endpoint one (not)
    violations = text.split('id="violations"')[1].split("</section>")[0]
    assert violations.count("<tr><td>") == 2
    assert violations.count("<code>127.0.0.2</code>") == 2
    api = row_of(violations, ">api<")
    assert "Billing sync" in api and api.endswith("<td>yes</td>")
    token = row_of(violations, ">token<")
    assert token.endswith("<td>no</td>")
    assert re.search(r'<time datetime="[0-9T:.+-]+">[0-9 :-]+ UTC</time>', violations)
    # recent changes: when, who, what
    changes = text.split('id="changes"')[1].split("</section>")[0]
    assert "Renamed “Web portal” to “Customer portal”" in changes
    assert "admin key “first admin key”" in changes
    assert "Created application “Billing sync” (client_credentials)" in changes
    assert "Created application “Web portal” (authorization_code)" in changes  # as then
    assert f"Added admin {company.admin_email}" in changes
    # nothing of the other company
    for leak in (other.company_id, other.admin_email, theirs["client_id"], "Globex"):
        assert leak not in text
    # accessible tables
    assert text.count("<caption>") == 3
    assert '<th scope="col">Live tokens</th>' in text


async def test_every_value_is_escaped(client, company):
    evil = '<script>alert("x")</script>'
    await new_app(client, company, name=evil)
    await sign_in(client, company.admin_email, company.admin_password)
    text = await dashboard(client)
    assert evil not in text
    assert str(markupsafe.escape(evil)) in text  # Jinja2's escaping: " becomes &#34;
    assert "<script" not in text


async def test_sign_out_ends_the_session(client, company):
    await sign_in(client, company.admin_email, company.admin_password)
    text = await dashboard(client)
    response = await client.post(
        "/dashboard/logout",
        data={"csrf_token": hidden(text, "csrf_token")},
        allow_redirects=False,
    )
    assert response.status == 303
    assert "<h1>Sign in</h1>" in await (await client.get("/dashboard")).text()


async def test_sign_out_without_the_sessions_token_leaves_the_session_and_its_cookies(
    client, company
):
    """Another site can post to /dashboard/logout, but without the session's token: the
    admin stays signed in, on the server and in the browser."""
    await sign_in(client, company.admin_email, company.admin_password)
    text = await dashboard(client)
    forged = await client.post("/dashboard/logout", data={"csrf_token": "x"}, allow_redirects=False)
    assert forged.status == 403
    assert "tg_session" not in forged.cookies and "Set-Cookie" not in forged.headers
    assert "Signed in as" in await dashboard(client)
    # a session that has ended: its cookies are cleared, whatever the token
    genuine = await client.post(
        "/dashboard/logout", data={"csrf_token": hidden(text, "csrf_token")},
        allow_redirects=False,
    )  # fmt: skip
    assert genuine.status == 303
    client.session.cookie_jar.update_cookies({"tg_session": "ended-" + "x" * 40})
    stale = await client.post("/dashboard/logout", data={"csrf_token": "x"}, allow_redirects=False)
    assert stale.status == 303
    assert "tg_session" in stale.cookies and stale.cookies["tg_session"].value == ""


# --- the SQL views -------------------------------------------------------------------


async def test_the_views_return_the_expected_rows(client, company, db):
    other = await make_company(client, "Globex")
    await cc_token(client, await new_app(client, other, name="Theirs"))
    sync, web = await violation_from_outside(client, company)
    response = await client.patch(
        f"/admin/applications/{sync['client_id']}",
        json={"permissions": ["invoices:read"]},
        headers=company.auth | {"X-Request-Id": "perm-1"},
    )
    assert response.status == 200
    await caught_up(client)

    violations = await db.pool.fetch(
        "SELECT * FROM v_ip_violations WHERE company_id = $1 ORDER BY position",
        company.company_id,
    )
    assert [(v["client_id"], v["ip"], v["endpoint"], v["token_revoked"]) for v in violations] == [
        (sync["client_id"], "127.0.0.2", "api", True),
        (sync["client_id"], "127.0.0.2", "token", False),
    ]
    assert await db.pool.fetchval("SELECT count(*) FROM v_ip_violations") == 2

    counts = await db.pool.fetch(
        "SELECT client_id, company_id, name, live_tokens FROM v_live_tokens_per_application "
        "ORDER BY name"
    )
    assert [tuple(r) for r in counts] == [
        (sync["client_id"], company.company_id, "Billing sync", 2),
        (next(r["client_id"] for r in counts if r["name"] == "Theirs"), other.company_id,
         "Theirs", 1),
        (web["client_id"], company.company_id, "Web portal", 0),
    ]  # fmt: skip

    changes = await db.pool.fetch(
        "SELECT * FROM v_admin_changes WHERE company_id = $1 ORDER BY position",
        company.company_id,
    )
    assert [c["type"] for c in changes] == [
        "UserAdded",
        "AdminKeyIssued",
        "ApplicationCreated",
        "ApplicationCreated",
        "PermissionsChanged",
    ]
    perm = changes[-1]
    assert perm["actor"].startswith("admin_key:")
    assert perm["client_ip"] == "127.0.0.1"
    assert perm["request_id"] == "perm-1"
    assert json.loads(perm["payload"])["before"] == ["invoices:read", "debtors:read"]
    assert json.loads(perm["payload"])["after"] == ["invoices:read"]
    assert json.loads(changes[0]["payload"])["password_hash"] == "[redacted]"
    everything = await db.pool.fetch("SELECT payload::text FROM v_admin_changes")
    assert "$argon2" not in str([tuple(r) for r in everything])
    # the view lists the same change types as the dashboard code
    definition = await db.pool.fetchval("SELECT pg_get_viewdef('v_admin_changes')")
    listed = definition.split("ANY")[1]
    assert set(re.findall(r"'([A-Za-z]+)'::text", listed)) == set(CHANGE_TYPES)
