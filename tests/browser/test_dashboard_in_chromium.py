"""The dashboard in real Chromium: sign in, the overview, sign out for good."""

from __future__ import annotations

import re

import pytest

from service.web import sessions
from tests.browser.steps import sign_in

pytestmark = pytest.mark.browser


async def test_sign_in_overview_and_sign_out(page, context, company, oauth_client):
    await page.goto("/dashboard")
    await page.get_by_role("heading", name="Sign in").wait_for()
    await sign_in(page, company.admin_email, company.admin_password)

    await page.get_by_role("heading", name="Acme", exact=True).wait_for()
    assert page.url.endswith("/dashboard")
    applications = page.get_by_role("table", name="Your company's applications")
    row = applications.get_by_role("row", name="Invoice Sync")
    assert await row.get_by_role("cell", name="authorization_code").is_visible()
    assert oauth_client.client_id in await row.inner_text()
    [session] = [c for c in await context.cookies() if c["name"] == sessions.COOKIE]

    await page.get_by_role("button", name="Sign out").click()

    await page.get_by_role("heading", name="Sign in").wait_for()
    assert page.url.endswith("/dashboard")
    assert sessions.COOKIE not in {cookie["name"] for cookie in await context.cookies()}
    # The session is over on the server too: its old cookie, put back, opens nothing.
    await context.add_cookies([session])
    await page.goto("/dashboard")
    assert await page.get_by_role("heading", name="Sign in").is_visible()
    assert await page.get_by_role("button", name="Sign out").count() == 0


async def test_a_member_signed_in_at_the_dashboard_signs_out_from_its_refusal(
    page, context, client, company, console
):
    """A member has no dashboard; the page that says so carries the way out, a sign-out
    form that works under the page's own CSP, so that the admin can sign in here next."""
    from tests.e2e.lifecycle_helpers import add_user

    member = await add_user(client, company.auth, "clerk@acme.example", "member")
    await page.goto("/dashboard")
    await sign_in(page, "clerk@acme.example", member["password"])
    await page.get_by_role("heading", name="Admins only").wait_for()
    assert "clerk@acme.example" in await page.inner_text("main")

    await page.get_by_role("button", name="Sign out").click()

    await page.get_by_role("heading", name="Sign in").wait_for()
    assert sessions.COOKIE not in {cookie["name"] for cookie in await context.cookies()}
    assert not [line for line in console.lines if "Content Security Policy" in line]
    await sign_in(page, company.admin_email, company.admin_password)
    await page.get_by_role("heading", name="Acme", exact=True).wait_for()


async def test_a_link_from_another_site_leaves_forms_open_in_other_tabs_working(
    page, context, company, service_url
):
    """An email or a chat opens a dashboard link in a new tab: a cross-site navigation,
    which carries the session cookie (SameSite=Lax) and nothing Strict. The session's
    CSRF token comes from that cookie, so the page opens in the same session, and a form
    already open in another tab still works."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    dashboard = f"{service_url}/dashboard"

    async def mail_page(_request: web.Request) -> web.Response:
        return web.Response(
            text=f'<!doctype html><html lang="en"><head><title>Mail</title></head><body><main>'
            f'<a href="{dashboard}">Open the dashboard</a></main></body></html>',
            content_type="text/html",
        )

    other = web.Application()
    other.router.add_get("/", mail_page)
    site = TestServer(other, host="127.0.0.1")
    await site.start_server()
    try:
        await page.goto("/dashboard/applications")
        await sign_in(page, company.admin_email, company.admin_password)
        await page.goto("/dashboard/applications/new")
        await page.get_by_role("radio", name=re.compile("^client_credentials")).check()
        await page.get_by_label("Name", exact=True).fill("Opened before the link")
        await page.get_by_label("IP allow list", exact=True).fill("127.0.0.1")
        await page.get_by_label("Notification email addresses", exact=True).fill("ops@acme.example")
        await page.get_by_role("checkbox", name=re.compile("^invoices:read")).check()
        [before] = [c["value"] for c in await context.cookies() if c["name"] == sessions.COOKIE]

        mail = await context.new_page()
        # "localhost" is another site than 127.0.0.1 (SameSite compares hosts, not ports)
        await mail.goto(str(site.make_url("/")).replace("127.0.0.1", "localhost"))
        await mail.get_by_role("link", name="Open the dashboard").click()
        await mail.get_by_role("heading", name="Acme", exact=True).wait_for()
        [after] = [c["value"] for c in await context.cookies() if c["name"] == sessions.COOKIE]
        assert after == before  # the same session, not swapped for a new one

        await page.get_by_role("button", name="Create application").click()
        await page.get_by_role("heading", name="Opened before the link").wait_for()
    finally:
        await site.close()


async def test_a_member_changes_their_own_password_from_the_refusal_page(
    page, context, client, company, console
):
    """SPEC §3: password change for oneself, in the browser too. A member's only page."""
    from tests.e2e.lifecycle_helpers import add_user

    member = await add_user(client, company.auth, "clerk@acme.example", "member")
    await page.goto("/dashboard")
    await sign_in(page, "clerk@acme.example", member["password"])
    await page.get_by_role("heading", name="Admins only").wait_for()
    await page.get_by_role("link", name="Change your password").click()
    await page.get_by_role("heading", name="Your password").wait_for()
    nav = page.get_by_role("navigation", name="Dashboard")
    assert [await a.inner_text() for a in await nav.get_by_role("link").all()] == ["Your password"]

    await page.get_by_label("Current password").fill("not the password at all")
    await page.get_by_label("New password", exact=True).fill("a ledger of mint and copper")
    await page.get_by_label("New password, again").fill("a ledger of mint and copper")
    await page.get_by_role("button", name="Change password").click()
    await page.get_by_role("alert").get_by_text("The current password is wrong.").wait_for()

    await page.get_by_label("Current password").fill(member["password"])
    await page.get_by_label("New password", exact=True).fill("a ledger of mint and copper")
    await page.get_by_label("New password, again").fill("a ledger of mint and copper")
    await page.get_by_role("button", name="Change password").click()
    await page.get_by_role("status").get_by_text("Password changed.").wait_for()
    assert not [line for line in console.lines if "Content Security Policy" in line]

    await page.get_by_role("button", name="Sign out").click()
    await page.get_by_role("heading", name="Sign in").wait_for()
    old = await client.post(
        "/session", json={"email": "clerk@acme.example", "password": member["password"]}
    )
    assert old.status == 401
    await sign_in(page, "clerk@acme.example", "a ledger of mint and copper")
    await page.get_by_role("heading", name="Admins only").wait_for()
