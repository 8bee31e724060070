"""The dashboard's own-password page (SPEC §3: password change for oneself), for admins
and members alike: the current password proven, the new one held to the rules, every
other session ended, behind the session's CSRF token."""

from __future__ import annotations

from service.web import sessions
from tests.e2e.lifecycle_helpers import add_user
from tests.e2e.test_dashboard import hidden
from tests.e2e.test_dashboard import sign_in as dashboard_sign_in

NEW = "a ledger of mint and copper"


async def change(client, current: str, new: str, confirm: str | None = None, token=None):
    page = await client.get("/dashboard/password")
    assert page.status == 200, await page.text()
    form = {
        "csrf_token": hidden(await page.text(), "csrf_token") if token is None else token,
        "current_password": current,
        "new_password": new,
        "confirm_password": new if confirm is None else confirm,
    }
    return await client.post("/dashboard/password", data=form, allow_redirects=False)


async def password_events(db) -> int:
    return await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'UserPasswordChanged'")


async def test_a_member_has_this_page_and_no_other(client, company):
    member = await add_user(client, company.auth, "clerk@acme.example", "member")
    await dashboard_sign_in_as(client, "clerk@acme.example", member["password"])
    refused = await client.get("/dashboard")
    assert refused.status == 403
    assert 'href="/dashboard/password"' in await refused.text()
    page = await client.get("/dashboard/password")
    assert page.status == 200
    text = await page.text()
    assert "Your password" in text and "/dashboard/people" not in text
    assert (await client.get("/dashboard/people")).status == 403


async def test_the_password_changes_and_every_other_session_ends(client, company, db):
    await dashboard_sign_in(client, company.admin_email, company.admin_password)
    elsewhere = client.session.cookie_jar.filter_cookies(client.make_url("/"))[sessions.COOKIE]
    client.session.cookie_jar.clear()  # the same user in another browser
    await dashboard_sign_in(client, company.admin_email, company.admin_password)
    answer = await change(client, company.admin_password, NEW)
    assert answer.status == 303
    assert answer.headers["Location"] == "/dashboard/password"
    page = await client.get("/dashboard/password")  # this browser: its new session
    assert page.status == 200
    assert "Password changed." in await page.text()
    client.session.cookie_jar.clear()
    ended = await client.get(
        "/dashboard", headers={"Cookie": f"{sessions.COOKIE}={elsewhere.value}"}
    )
    assert 'action="/dashboard/login"' in await ended.text()  # the other browser: signed out
    old = await client.post("/session", json={"email": company.admin_email,
                                              "password": company.admin_password})  # fmt: skip
    assert old.status == 401
    new = await client.post("/session", json={"email": company.admin_email, "password": NEW})
    assert new.status == 200
    assert await password_events(db) == 1


async def test_a_wrong_current_password_changes_nothing(client, company, db):
    await dashboard_sign_in(client, company.admin_email, company.admin_password)
    answer = await change(client, "not the password at all", NEW)
    assert answer.status == 403
    text = await answer.text()
    assert "The password was not changed." in text and "The current password is wrong." in text
    assert await password_events(db) == 0
    assert (await client.get("/dashboard/password")).status == 200  # still signed in


async def test_a_weak_or_unconfirmed_new_password_is_refused_with_its_reason(client, company, db):
    await dashboard_sign_in(client, company.admin_email, company.admin_password)
    weak = await change(client, company.admin_password, "password1234")
    assert weak.status == 400
    assert "too easy to guess" in await weak.text()
    differ = await change(client, company.admin_password, NEW, confirm=NEW + "!")
    assert differ.status == 400
    assert "confirmation differ" in await differ.text()
    same = await change(client, company.admin_password, company.admin_password)
    assert same.status == 400
    assert "must differ from the current password" in (await same.text()).lower()
    assert await password_events(db) == 0


async def test_without_the_sessions_csrf_token_nothing_changes(client, company, db):
    await dashboard_sign_in(client, company.admin_email, company.admin_password)
    for token in ("", "forged"):
        answer = await change(client, company.admin_password, NEW, token=token)
        assert answer.status == 403
    assert await password_events(db) == 0


async def test_signed_out_the_page_is_the_sign_in_form(client):
    page = await client.get("/dashboard/password")
    assert 'action="/dashboard/login"' in await page.text()
    posted = await client.post("/dashboard/password", data={"current_password": "x"})
    assert posted.status == 403


async def dashboard_sign_in_as(client, email: str, password: str) -> None:
    """A member's sign-in: the form answers 303 to /dashboard, which then refuses them."""
    page = await client.get("/dashboard")
    response = await client.post(
        "/dashboard/login",
        data={"email": email, "password": password, "csrf_token": hidden(await page.text(), "csrf_token")},
        allow_redirects=False,
    )  # fmt: skip
    assert response.status == 303, await response.text()


async def test_past_the_attempts_allowed_the_form_says_when_to_try_again(client, company, db):
    await dashboard_sign_in(client, company.admin_email, company.admin_password)
    statuses = []
    for _ in range(8):
        answer = await change(client, "not the password at all", NEW)
        statuses.append(answer.status)
        if answer.status == 429:
            break
    assert statuses[-1] == 429, statuses
    assert int(answer.headers["Retry-After"]) >= 1
    assert "Too many attempts: try again in" in await answer.text()
    assert await password_events(db) == 0
