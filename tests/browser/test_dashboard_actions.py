"""Every dashboard page and action in real Chromium under the pages' real CSP: create,
edit, rotate and delete applications; client authentication and private_key_jwt keys;
revoke a connection; people and admin keys; the history; sign out; axe-core on every page;
one action with the keyboard alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from joserfc.jwk import ECKey, RSAKey
from playwright.async_api import Page, expect

from service.web import sessions
from tests.browser.steps import accessible, arrive, sign_in
from tests.e2e.oauth_helpers import basic, cc_token, new_app
from tests.e2e.test_admin_people import caught_up
from tests.e2e.test_dpop import cc_request
from tests.e2e.test_private_key_jwt import assertion, token_request

pytestmark = pytest.mark.browser

SCREENSHOTS = Path("/tmp/dashboard-screenshots")


async def signed_in(page: Page, company, path: str = "/dashboard") -> None:
    """Through the sign-in form, once per test; then `path`."""
    await page.goto("/dashboard")
    await sign_in(page, company.admin_email, company.admin_password)
    await page.get_by_role("heading", name="Acme", exact=True).wait_for()
    if path != "/dashboard":
        await page.goto(path)


async def token_status(client, client_id: str, secret: str) -> int:
    response = await client.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, headers=basic(client_id, secret)
    )
    return response.status


async def shown_secret(page: Page) -> str:
    field = page.locator("#secret")  # the one read-only field of a notice
    await expect(page.get_by_text("you will not see this again")).to_be_visible()
    return await field.input_value()


async def create_through_the_form(page: Page, name: str) -> str:
    """A client_credentials application, made on the New application page; its id."""
    await page.goto("/dashboard/applications")
    await page.get_by_role("link", name="New application").click()
    await page.get_by_role("radio", name=re.compile("^client_credentials")).check()
    await page.get_by_label("Name", exact=True).fill(name)
    await page.get_by_label("IP allow list", exact=True).fill("127.0.0.1")
    await page.get_by_label("Notification email addresses", exact=True).fill("ops@acme.example")
    await page.get_by_role("checkbox", name=re.compile("^invoices:read")).check()
    await page.get_by_role("button", name="Create application").click()
    await page.get_by_role("heading", name=name).wait_for()
    return page.url.rsplit("/", 1)[1]


# --- applications ----------------------------------------------------------------------


async def test_a_new_application_shows_its_secret_once(page, client, company):
    await signed_in(page, company)
    client_id = await create_through_the_form(page, "Ledger export")

    await expect(page.get_by_role("status").first).to_have_text(
        "Application “Ledger export” created."
    )
    secret = await shown_secret(page)
    assert await token_status(client, client_id, secret) == 200
    # The copy button's script ran under the page's CSP (a hash allows it, nothing else).
    copy = page.get_by_role("button", name="Copy")
    await expect(copy).to_be_visible()
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    await copy.click()
    await expect(page.get_by_text("Copied to the clipboard.")).to_be_visible()
    assert await page.evaluate("navigator.clipboard.readText()") == secret

    await page.reload()
    await page.get_by_role("heading", name="Ledger export").wait_for()
    assert await page.get_by_role("textbox", name="Client secret").count() == 0
    assert secret not in await page.content()


async def test_an_edit_shows_the_apis_validation_message_then_saves(page, client, company):
    app = await new_app(
        client, company, name="Web portal", grant_type="authorization_code", ip_allowlist=[]
    )
    api = await client.patch(
        f"/admin/applications/{app['client_id']}",
        json={"redirect_uri": "http://portal.example/cb"},
        headers=company.auth,
    )
    api_message = (await api.json())["error_description"]
    await signed_in(page, company, f"/dashboard/applications/{app['client_id']}")

    await page.get_by_label("Redirect URI", exact=True).fill("http://portal.example/cb")
    await page.get_by_role("button", name="Save changes").click()
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text(api_message)
    assert api_message.startswith("redirect_uri: must use https")
    # What was typed is still there to correct.
    assert (
        await page.get_by_label("Redirect URI", exact=True).input_value()
        == "http://portal.example/cb"
    )

    await page.get_by_label("Redirect URI", exact=True).fill("https://portal.example/cb")
    await page.get_by_label("Name", exact=True).fill("Customer portal")
    await page.get_by_role("checkbox", name=re.compile("^debtors:read")).uncheck()
    await page.get_by_label("Notification email addresses", exact=True).fill(
        "a@acme.example\nb@acme.example"
    )
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.get_by_role("status").first).to_have_text("Saved.")
    await page.get_by_role("heading", name="Customer portal").wait_for()
    stored = await (
        await client.get(f"/admin/applications/{app['client_id']}", headers=company.auth)
    ).json()
    assert stored["redirect_uri"] == "https://portal.example/cb"
    assert stored["permissions"] == ["invoices:read"]
    assert stored["notification_emails"] == ["a@acme.example", "b@acme.example"]


async def test_rotating_shows_the_new_secret_once_and_the_old_one_is_refused(page, client, company):
    app = await new_app(client, company, name="Billing sync")
    await signed_in(page, company, f"/dashboard/applications/{app['client_id']}")

    await page.get_by_role("button", name="Rotate the secret").click()
    secret = await shown_secret(page)
    assert secret != app["client_secret"]
    assert await token_status(client, app["client_id"], app["client_secret"]) == 401
    assert await token_status(client, app["client_id"], secret) == 200
    await page.reload()
    assert secret not in await page.content()


async def test_revoke_all_tokens_kills_the_applications_live_tokens(page, client, company):
    app = await new_app(client, company, name="Leaky sync")
    token = await cc_token(client, app)
    whoami = {"Authorization": f"Bearer {token['access_token']}"}
    assert (await client.get("/api/v1/whoami", headers=whoami)).status == 200
    await signed_in(page, company, f"/dashboard/applications/{app['client_id']}")

    await page.get_by_role("button", name="Revoke all tokens").click()
    await expect(page.get_by_role("status").first).to_contain_text("1 live grant(s)")
    assert (await client.get("/api/v1/whoami", headers=whoami)).status == 401
    assert await token_status(client, app["client_id"], app["client_secret"]) == 200


async def test_delete_asks_first_then_the_application_is_gone(page, client, company):
    app = await new_app(client, company, name="Old importer")
    await signed_in(page, company, f"/dashboard/applications/{app['client_id']}")

    await page.get_by_role("link", name="Delete this application…").click()
    await page.get_by_role("heading", name="Delete Old importer?").wait_for()
    await page.get_by_role("link", name="Cancel").click()
    await page.get_by_role("heading", name="Old importer").wait_for()
    assert (
        await client.get(f"/admin/applications/{app['client_id']}", headers=company.auth)
    ).status == 200

    await page.get_by_role("link", name="Delete this application…").click()
    await page.get_by_role("button", name="Delete application").click()
    await page.get_by_role("heading", name="Applications", exact=True).wait_for()
    await expect(page.get_by_role("status").first).to_contain_text("“Old importer” deleted")
    assert await page.get_by_role("link", name="Old importer").count() == 0
    gone = await client.get(f"/admin/applications/{app['client_id']}", headers=company.auth)
    assert gone.status == 404
    assert await token_status(client, app["client_id"], app["client_secret"]) == 401


# --- client authentication -------------------------------------------------------------

KEYS_TABLE = "The keys this application signs its client assertions with"


async def test_a_pasted_jwk_set_is_listed_signs_then_is_removed(page, client, company):
    app = await new_app(
        client, company, name="Signer", token_endpoint_auth_method="private_key_jwt"
    )
    key = ECKey.generate_key("P-256", parameters={"kid": "signer/2026"})
    await signed_in(page, company, f"/dashboard/applications/{app['client_id']}")
    await expect(page.get_by_text("No keys yet")).to_be_visible()

    pasted = json.dumps({"keys": [key.as_dict(private=False)]}, indent=2)
    await page.get_by_label("Add public keys", exact=True).fill(pasted)
    await page.get_by_role("button", name="Add keys").click()
    await expect(page.get_by_role("status").first).to_contain_text("“signer/2026” added")
    row = page.get_by_role("table", name=KEYS_TABLE).get_by_role("row", name="signer/2026")
    await expect(row).to_contain_text(key.thumbprint())
    await expect(row).to_contain_text("EC P-256")
    assert (await token_request(client, assertion(client, app, key=key))).status == 200

    await row.get_by_role("link", name="Remove the key signer/2026").click()
    await page.get_by_role("heading", name="Remove the key signer/2026?").wait_for()
    await page.get_by_role("button", name="Remove the key signer/2026").click()
    await expect(page.get_by_role("status").first).to_contain_text("“signer/2026” removed")
    await expect(page.get_by_text("No keys yet")).to_be_visible()
    assert await page.get_by_role("table", name=KEYS_TABLE).count() == 0
    refused = await token_request(client, assertion(client, app, key=key))
    assert refused.status == 400  # invalid_client, the assertion in the body


async def test_a_pasted_private_key_is_refused_and_not_shown_again(page, client, company):
    app = await new_app(
        client, company, name="Signer", token_endpoint_auth_method="private_key_jwt"
    )
    key = RSAKey.generate_key(2048, parameters={"kid": "oops"})
    private = key.as_dict(private=True)
    await signed_in(page, company, f"/dashboard/applications/{app['client_id']}")
    await page.get_by_label("Add public keys", exact=True).fill(json.dumps(private))
    await page.get_by_role("button", name="Add keys").click()
    await expect(page.get_by_role("alert")).to_contain_text("private key material")
    assert await page.get_by_label("Add public keys", exact=True).input_value() == ""
    content = await page.content()
    assert all(private[m] not in content for m in ("d", "p", "q", "dp", "dq", "qi"))
    await accessible(page)  # the page with its error


async def test_the_method_and_dpop_are_changed_with_the_form(page, client, company):
    app = await new_app(client, company, name="Billing sync")
    await signed_in(page, company, f"/dashboard/applications/{app['client_id']}")
    assert await page.get_by_role("radio", name=re.compile("^none")).count() == 0
    await page.get_by_role("radio", name=re.compile("^client_secret_post")).check()
    await page.get_by_role("checkbox", name="Require DPoP-bound tokens").check()
    await page.get_by_label("Live-token limit", exact=True).fill("3")
    await page.get_by_role("button", name="Save authentication").click()
    await expect(page.get_by_role("status").first).to_have_text("Client authentication saved.")
    await expect(page.get_by_role("checkbox", name="Require DPoP-bound tokens")).to_be_checked()
    await expect(page.get_by_label("Live-token limit", exact=True)).to_have_value("3")
    stored = await (
        await client.get(f"/admin/applications/{app['client_id']}", headers=company.auth)
    ).json()
    assert stored["token_endpoint_auth_method"] == "client_secret_post"
    assert stored["dpop_bound_access_tokens"] is True
    assert stored["cc_token_limit"] == 3
    assert (await cc_request(client, app)).status == 400  # no DPoP proof

    await page.get_by_role("checkbox", name="Require DPoP-bound tokens").uncheck()
    await page.get_by_label("Live-token limit", exact=True).fill("")
    await page.get_by_role("button", name="Save authentication").click()
    await expect(page.get_by_role("status").first).to_have_text("Client authentication saved.")
    assert (await cc_request(client, app)).status == 200


# --- connections -----------------------------------------------------------------------


async def test_a_connection_is_listed_and_revoked(
    page, console, client, company, oauth_client, callback
):
    """Consent in the browser, then the same session (made by the consent page's sign-in,
    so the dashboard renews it) revokes the connection; its token stops working."""
    await page.goto(oauth_client.authorize_path(state="c-1"))
    await sign_in(page, company.admin_email, company.admin_password)
    await page.get_by_role("button", name="Allow").click()
    await arrive(page, callback.url, console)
    tokens = await (await oauth_client.exchange(client, callback.received[0]["code"])).json()
    whoami = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert (await client.get("/api/v1/whoami", headers=whoami)).status == 200

    await page.goto("/dashboard/connections")
    table = page.get_by_role("table", name="Applications your company allowed")
    row = table.get_by_role("row", name=re.compile("Invoice Sync"))
    await expect(row).to_contain_text(company.admin_email)
    await expect(row).to_contain_text("invoices:read")
    published = page.get_by_role("table", name="Who uses the applications your company publishes")
    await expect(published.get_by_role("row", name=re.compile("Invoice Sync"))).to_contain_text(
        "Acme"
    )

    await row.get_by_role("button", name="Revoke the connection to Invoice Sync").click()
    await expect(page.get_by_role("status").first).to_contain_text("revoked")
    assert await page.get_by_role("table", name="Applications your company allowed").count() == 0
    assert (await client.get("/api/v1/whoami", headers=whoami)).status == 401


# --- people and keys -------------------------------------------------------------------


async def test_add_a_person_change_their_role_and_remove_them(page, client, company):
    await signed_in(page, company, "/dashboard/people")
    await page.get_by_label("Email", exact=True).fill("clerk@acme.example")
    await page.get_by_label("Role", exact=True).select_option("member")
    await page.get_by_role("button", name="Add person").click()
    password = await shown_secret(page)
    signed = await client.post(
        "/session", json={"email": "clerk@acme.example", "password": password}
    )
    assert signed.status == 200 and (await signed.json())["role"] == "member"

    await page.get_by_label("Role of clerk@acme.example", exact=True).select_option("admin")
    await page.get_by_role("button", name="Change the role of clerk@acme.example").click()
    await expect(page.get_by_role("status").first).to_have_text("clerk@acme.example is now admin.")
    assert (
        await page.get_by_label("Role of clerk@acme.example", exact=True).input_value() == "admin"
    )

    await page.get_by_role("button", name="Reset the password of clerk@acme.example").click()
    new_password = await shown_secret(page)
    assert new_password != password

    await page.get_by_role("link", name="Remove clerk@acme.example").click()
    await page.get_by_role("button", name="Remove clerk@acme.example").click()
    await expect(page.get_by_role("status").first).to_contain_text("clerk@acme.example removed")
    assert await page.get_by_role("row", name=re.compile("clerk@acme.example")).count() == 0
    refused = await client.post(
        "/session", json={"email": "clerk@acme.example", "password": new_password}
    )
    assert refused.status == 401


async def test_a_password_easy_to_guess_is_refused_with_its_reason_on_the_page(
    page, client, company, db
):
    await signed_in(page, company, "/dashboard/people")
    await expect(page.get_by_label("Password", exact=True)).to_have_accessible_description(
        re.compile("not a common password")
    )
    await page.get_by_label("Email", exact=True).fill("clerk@acme.example")
    await page.get_by_label("Password", exact=True).fill("password1234")
    await page.get_by_role("button", name="Add person").click()
    await expect(page.get_by_role("alert")).to_contain_text(
        "password is too easy to guess: This is a very common password"
    )
    assert await page.get_by_label("Email", exact=True).input_value() == "clerk@acme.example"
    added = "SELECT count(*) FROM events WHERE type = 'UserAdded'"
    assert await db.pool.fetchval(added) == 1  # the company's first admin only

    await page.get_by_label("Password", exact=True).fill("a ledger of mint and copper")
    await page.get_by_role("button", name="Add person").click()
    await expect(page.get_by_role("status").first).to_have_text(
        "clerk@acme.example added as member."
    )
    signed = await client.post(
        "/session", json={"email": "clerk@acme.example", "password": "a ledger of mint and copper"}
    )
    assert signed.status == 200


async def test_issue_an_admin_key_shown_once_then_revoke_it(page, client, company):
    await signed_in(page, company, "/dashboard/keys")
    await page.get_by_label("Label", exact=True).fill("deploy script")
    await page.get_by_role("button", name="Issue key").click()
    key = await shown_secret(page)
    bearer = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/admin/applications", headers=bearer)).status == 200
    await page.reload()
    assert key not in await page.content()

    await page.get_by_role("button", name="Revoke the admin key deploy script").click()
    await expect(page.get_by_role("status").first).to_contain_text("“deploy script” revoked")
    row = page.get_by_role("row", name=re.compile("deploy script"))
    await expect(row).to_contain_text("revoked")
    assert (await client.get("/admin/applications", headers=bearer)).status == 401


async def test_an_admin_key_issued_with_the_keyboard_alone(page, client, company):
    await signed_in(page, company, "/dashboard/keys")
    for _ in range(40):  # Tab through the page to the label field, as a person would
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement.id") == "label":
            break
    else:
        raise AssertionError("Tab never reached the Label field")
    await page.keyboard.type("keyboard key")
    await page.keyboard.press("Enter")
    key = await shown_secret(page)
    assert (
        await client.get("/admin/keys", headers={"Authorization": f"Bearer {key}"})
    ).status == 200


# --- history and sign-out --------------------------------------------------------------


async def test_the_history_is_filtered_and_paginated_with_before_and_after(page, client, company):
    app = await new_app(client, company, name="Name 0")
    other = await new_app(client, company, name="Other app")
    for n in range(1, 31):  # 30 renames: more than a page of 25
        response = await client.patch(
            f"/admin/applications/{app['client_id']}",
            json={"name": f"Name {n}"},
            headers=company.auth,
        )
        assert response.status == 200
    await client.patch(
        f"/admin/applications/{other['client_id']}",
        json={"name": "Renamed other"},
        headers=company.auth,
    )
    await signed_in(page, company, "/dashboard/history")

    await page.get_by_label("Event type").select_option("ApplicationRenamed")
    await page.get_by_label("Application").select_option(label="Name 30")
    await page.get_by_role("button", name="Show").click()
    table = page.get_by_role("table", name="The company's events, newest first")
    rows = table.locator("tbody tr")
    await expect(rows).to_have_count(25)
    first = rows.first
    await expect(first.locator("td").nth(3)).to_have_text("Name 29")  # before
    await expect(first.locator("td").nth(4)).to_have_text("Name 30")  # after
    assert "Renamed other" not in await table.inner_text()

    await page.get_by_role("link", name="Older events").click()
    await expect(rows).to_have_count(5)
    await expect(rows.last.locator("td").nth(3)).to_have_text("Name 0")
    assert await page.get_by_role("link", name="Older events").count() == 0
    assert await page.get_by_label("Event type").input_value() == "ApplicationRenamed"

    await page.get_by_label("Until (UTC)").fill("2001-01-01T00:00")
    await page.get_by_role("button", name="Show").click()
    await page.get_by_text("No events match.").wait_for()


async def test_sign_out_from_a_page_other_than_the_overview(page, context, company):
    await signed_in(page, company, "/dashboard/connections")
    await page.get_by_role("heading", name="Connections").wait_for()
    await page.get_by_role("button", name="Sign out").click()
    await page.get_by_role("heading", name="Sign in").wait_for()
    assert sessions.COOKIE not in {c["name"] for c in await context.cookies()}
    await page.goto("/dashboard/keys")
    await page.get_by_role("heading", name="Sign in").wait_for()


# --- axe-core on every page ------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_every_dashboard_page_is_accessible(page, client, company, oauth_client, scheme):
    await page.emulate_media(color_scheme=scheme)
    app = await new_app(client, company, name="Billing sync")
    await new_app(client, company, name="<b>escaped</b>")
    key = ECKey.generate_key("P-256", parameters={"kid": "signer/1"})
    keyed = await new_app(
        client, company, name="Signer", token_endpoint_auth_method="private_key_jwt",
        jwks={"keys": [key.as_dict(private=False)]},
    )  # fmt: skip
    await signed_in(page, company)
    await caught_up(client)
    made = await client.post(
        "/admin/users", json={"email": "clerk@acme.example", "role": "member"}, headers=company.auth
    )
    clerk = (await made.json())["user_id"]
    pages = {
        "overview": "/dashboard",
        "applications": "/dashboard/applications",
        "new-application": "/dashboard/applications/new",
        "application": f"/dashboard/applications/{app['client_id']}",
        "delete-application": f"/dashboard/applications/{app['client_id']}/delete",
        "application-with-keys": f"/dashboard/applications/{keyed['client_id']}",
        "remove-key": f"/dashboard/applications/{keyed['client_id']}/keys/remove?kid=signer/1",
        "connections": "/dashboard/connections",
        "people": "/dashboard/people",
        "remove-person": f"/dashboard/people/{clerk}/remove",
        "keys": "/dashboard/keys",
        "history": "/dashboard/history",
        "password": "/dashboard/password",
    }
    for name, path in pages.items():
        await page.goto(path)
        await page.get_by_role("button", name="Sign out").wait_for()
        await accessible(page)
        if scheme == "light":
            SCREENSHOTS.mkdir(exist_ok=True)
            await page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)
    # A form with its error, and a secret shown once (with the copy button's script)
    await page.goto("/dashboard/applications/new")
    await page.get_by_label("Name", exact=True).fill("No redirect URI")
    await page.get_by_role("button", name="Create application").click()
    await page.get_by_role("alert").wait_for()
    await accessible(page)
    await create_through_the_form(page, "Shown once")
    await shown_secret(page)
    await accessible(page)
    if scheme == "light":
        await page.screenshot(path=SCREENSHOTS / "secret-shown-once.png", full_page=True)
