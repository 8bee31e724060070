"""The authorization_code flow as a person does it, in real Chromium under the pages' real
CSP: sign in, consent, and back at the application with a code (or a refusal)."""

from __future__ import annotations

import pytest

from service.app import CONTEXT
from service.web import sessions
from tests.browser.steps import arrive, sign_in
from tests.e2e.oauth_helpers import basic

pytestmark = pytest.mark.browser


async def count(db, event_type: str) -> int:
    return await db.pool.fetchval("SELECT count(*) FROM events WHERE type = $1", event_type)


async def test_allow_brings_the_browser_back_with_a_code_that_buys_tokens(
    page, console, client, company, oauth_client, callback, db
):
    await page.goto(oauth_client.authorize_path(state="allow-1"))
    await sign_in(page, company.admin_email, company.admin_password)
    await page.get_by_role("heading", name="Allow Invoice Sync to access Acme?").wait_for()

    await page.get_by_role("button", name="Allow").click()

    await arrive(page, callback.url, console)
    assert await page.get_by_role("heading", name="Back at the application").is_visible()
    [received] = callback.received
    assert set(received) == {"code", "state", "iss"}  # RFC 9207: the issuer comes along
    assert received["state"] == "allow-1"
    response = await oauth_client.exchange(client, received["code"])
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["token_type"] == "Bearer"
    assert body["access_token"] and body["refresh_token"]
    assert sorted(body["scope"].split()) == ["debtors:read", "invoices:read"]
    assert await count(db, "ConnectionGranted") == 1


async def test_deny_brings_the_browser_back_with_access_denied(
    page, console, company, oauth_client, callback, db
):
    await page.goto(oauth_client.authorize_path(state="deny-1"))
    await sign_in(page, company.admin_email, company.admin_password)

    await page.get_by_role("button", name="Deny").click()

    await arrive(page, callback.url, console)
    [received] = callback.received
    assert received.pop("iss")  # RFC 9207: the issuer comes along
    assert received == {"error": "access_denied", "state": "deny-1"}
    assert await count(db, "ConnectionGranted") == 0
    assert await count(db, "AuthorizationCodeIssued") == 0


async def test_an_error_held_until_sign_in_reaches_the_application_after_it(
    page, console, client, company, oauth_client, callback
):
    """An unsupported response_type goes back to the application only once the user has
    signed in: the redirect then ends the sign-in form's submission, under its CSP."""
    await page.goto(oauth_client.authorize_path(state="token-1", response_type="token"))
    await sign_in(page, company.admin_email, company.admin_password)

    await arrive(page, callback.url, console)
    [received] = callback.received
    assert received.pop("iss") == client.app[CONTEXT].settings.issuer  # RFC 9207
    assert received == {"error": "unsupported_response_type", "state": "token-1"}


async def test_a_wrong_password_shows_the_error_and_sets_no_session(
    page, context, company, oauth_client, callback
):
    await page.goto(oauth_client.authorize_path(state="wrong"))
    await sign_in(page, company.admin_email, "not-the-password")

    alert = page.get_by_role("alert")
    await alert.wait_for()
    assert await alert.inner_text() == "Wrong email or password."
    assert await page.get_by_label("Password").input_value() == ""
    assert sessions.COOKIE not in {cookie["name"] for cookie in await context.cookies()}
    assert callback.received == []


async def test_the_whole_flow_works_from_the_keyboard_alone(
    page, console, client, company, oauth_client, callback
):
    await page.goto(oauth_client.authorize_path(state="keys"))
    # The email field takes the focus itself (autofocus): no pointer needed to start.
    # Chromium runs autofocus at a rendering step after the load event, so wait for it.
    await page.wait_for_function("document.activeElement?.id === 'email'", timeout=5000)
    await page.keyboard.type(company.admin_email)
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "password"
    await page.keyboard.type(company.admin_password)
    async with page.expect_navigation():
        await page.keyboard.press("Enter")

    await page.get_by_role("button", name="Allow").wait_for()
    await tab_to(page, "Allow")
    await page.keyboard.press("Enter")

    await arrive(page, callback.url, console)
    [received] = callback.received
    assert received["state"] == "keys"
    assert (await oauth_client.exchange(client, received["code"])).status == 200


async def tab_to(page, label: str, limit: int = 10) -> None:
    """Press Tab until the focused element is the control named `label`."""
    for _ in range(limit):
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement.textContent") == label:
            return
    raise AssertionError(f"{label!r} cannot be reached with the Tab key")


async def test_a_request_without_redirect_uri_comes_back_to_the_registered_one(
    page, console, client, company, oauth_client, callback
):
    """RFC 6749 §3.1.2.3: the one registered redirect URI, under the sign-in and consent
    pages' CSP form-action (Chromium enforces it on the redirect that ends a form), and a
    token request that does not name it either (§4.1.3)."""
    path = oauth_client.authorize_path(state="left-out")
    without = path.replace("redirect_uri=", "x-left-out=")
    assert "redirect_uri" not in without
    await page.goto(without)
    await sign_in(page, company.admin_email, company.admin_password)
    await page.get_by_role("button", name="Allow").click()

    await arrive(page, callback.url, console)
    [received] = callback.received
    assert received["state"] == "left-out"
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "authorization_code", "code": received["code"],
              "code_verifier": oauth_client.verifier},
        headers=basic(oauth_client.client_id, oauth_client.app["client_secret"]),
    )  # fmt: skip
    assert response.status == 200, await response.text()


async def test_an_error_held_until_sign_in_reaches_the_registered_uri_when_none_is_named(
    page, console, company, oauth_client, callback
):
    without = oauth_client.authorize_path(state="held", response_type="token")
    await page.goto(without.replace("redirect_uri=", "x-left-out="))
    await sign_in(page, company.admin_email, company.admin_password)

    await arrive(page, callback.url, console)
    [received] = callback.received
    assert received["error"] == "unsupported_response_type"
    assert received["state"] == "held"
