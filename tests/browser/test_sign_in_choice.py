"""One address with accounts at two companies and one password for both: the sign-in asks
which company, in real Chromium under the pages' real CSP, and goes on to the consent page
or the dashboard of the company chosen. No password field, and no password, on that page."""

from __future__ import annotations

import pytest

from service.web import login
from tests.browser.steps import accessible, arrive, sign_in
from tests.conftest import Company

pytestmark = pytest.mark.browser

EMAIL = "pat@shared.example"
PASSWORD = "one password for both companies"
CHOOSE = "This address has accounts at several companies. Choose one:"


@pytest.fixture
async def both(client, company: Company, other_company: Company) -> None:
    """EMAIL an admin at Acme and at Globex, with the same password."""
    for at in (company, other_company):
        response = await client.post(
            "/admin/users",
            json={"email": EMAIL, "role": "admin", "password": PASSWORD},
            headers=at.auth,
        )
        assert response.status == 201, await response.text()


async def test_the_consent_flow_asks_which_company_then_reaches_the_application(
    page, console, client, company, both, oauth_client, callback
):
    await page.goto(oauth_client.authorize_path(state="choice-1"))
    await sign_in(page, EMAIL, PASSWORD)

    await page.get_by_role("heading", name="Choose a company").wait_for()
    assert page.url.endswith(login.CHOICE_PATH)
    assert await page.get_by_text(CHOOSE).is_visible()
    assert await page.get_by_role("button", name="Globex").is_visible()
    content = await page.content()
    assert PASSWORD not in content
    assert await page.locator("input[type=password]").count() == 0
    await accessible(page)

    await page.get_by_role("button", name="Acme").click()

    await page.get_by_role("heading", name="Allow Invoice Sync to access Acme?").wait_for()
    await page.get_by_role("button", name="Allow").click()
    await arrive(page, callback.url, console)
    [received] = callback.received
    assert received["state"] == "choice-1"
    response = await oauth_client.exchange(client, received["code"])
    assert response.status == 200, await response.text()
    assert "Content Security Policy" not in str(console)  # nothing the policy blocked


async def test_the_dashboard_asks_which_company_and_shows_the_one_chosen(
    page, console, company, both
):
    await page.goto("/dashboard")
    await sign_in(page, EMAIL, PASSWORD)

    await page.get_by_role("heading", name="Choose a company").wait_for()
    await page.get_by_role("button", name="Globex").click()

    await page.get_by_text("Tollgate · Globex").wait_for()
    assert page.url.endswith("/dashboard")
    assert await page.get_by_text(f"Signed in as {EMAIL}").is_visible()
    assert "Content Security Policy" not in str(console)

    # the choice was used up: going back to it asks to sign in again
    await page.goto(login.CHOICE_PATH)
    assert await page.get_by_role("heading", name="Sign in again").is_visible()


async def test_an_error_held_until_sign_in_reaches_the_application_after_the_choice(
    page, console, client, company, both, oauth_client, callback
):
    """The choice page's form ends in a redirect to the application (an unsupported
    response_type, held back until sign-in): its CSP form-action must let Chromium follow."""
    await page.goto(oauth_client.authorize_path(state="token-2", response_type="token"))
    await sign_in(page, EMAIL, PASSWORD)
    await page.get_by_role("button", name="Globex").click()

    await arrive(page, callback.url, console)
    [received] = callback.received
    assert received["error"] == "unsupported_response_type"
    assert received["state"] == "token-2"
