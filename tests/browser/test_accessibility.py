"""axe-core over every page a person sees, as Chromium renders it, in light and dark mode
(the pages follow the system's colour scheme)."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from tests.browser.steps import accessible, sign_in

pytestmark = [pytest.mark.browser, pytest.mark.parametrize("scheme", ["light", "dark"])]


@pytest.fixture
async def shown(page, scheme):
    await page.emulate_media(color_scheme=scheme)
    return page


async def test_the_sign_in_page_is_accessible(shown, oauth_client):
    await shown.goto(oauth_client.authorize_path(state="a11y"))
    await shown.get_by_role("heading", name="Sign in").wait_for()
    await accessible(shown)


async def test_the_sign_in_page_with_its_error_is_accessible(shown, company, oauth_client):
    await shown.goto(oauth_client.authorize_path(state="a11y"))
    await sign_in(shown, company.admin_email, "not-the-password")
    await shown.get_by_role("alert").wait_for()
    await accessible(shown)


async def test_the_consent_page_is_accessible(shown, company, oauth_client):
    await shown.goto(oauth_client.authorize_path(state="a11y"))
    await sign_in(shown, company.admin_email, company.admin_password)
    await shown.get_by_role("button", name="Allow").wait_for()
    await accessible(shown)


async def test_the_error_page_for_a_wrong_redirect_uri_is_accessible(shown, oauth_client):
    query = urlencode(
        {
            "response_type": "code",
            "client_id": oauth_client.client_id,
            "redirect_uri": "https://attacker.example/callback",
        }
    )
    await shown.goto(f"/oauth/authorize?{query}")
    await shown.get_by_role("heading", name="Invalid redirect URI").wait_for()
    await accessible(shown)


async def test_the_dashboard_sign_in_page_is_accessible(shown):
    await shown.goto("/dashboard")
    await shown.get_by_role("heading", name="Sign in").wait_for()
    await accessible(shown)


async def test_the_dashboard_is_accessible(shown, company, oauth_client):
    await shown.goto("/dashboard")
    await sign_in(shown, company.admin_email, company.admin_password)
    await shown.get_by_role("button", name="Sign out").wait_for()
    await accessible(shown)
