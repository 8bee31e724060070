"""Every change the dashboard makes needs the session's own CSRF token: without it, or
with another session's, nothing changes and the answer is a 403 page. With it, the same
token also works for the JSON admin API (X-CSRF-Token)."""

from __future__ import annotations

import json

import pytest
from joserfc.jwk import ECKey

from tests.conftest import make_company
from tests.e2e.oauth_helpers import new_app
from tests.e2e.test_dashboard import hidden, sign_in

# A public key the application has (so that its removal would change something) and one
# it has not (so that adding it would).
REGISTERED = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
JWKS = json.dumps({"keys": [ECKey.generate_key("P-256").as_dict(private=False)]})


async def events(db) -> int:
    return await db.pool.fetchval("SELECT count(*) FROM events")


async def the_token(client) -> str:
    page = await client.get("/dashboard/keys")
    assert page.status == 200
    return hidden(await page.text(), "csrf_token")


def changes(client_id: str, user_id: str, key_id: str) -> list[tuple[str, dict[str, str]]]:
    return [
        ("/dashboard/applications", {"name": "X", "grant_type": "client_credentials",
                                     "ip_allowlist": "127.0.0.1", "permissions": "invoices:read",
                                     "notification_emails": "a@acme.example"}),
        (f"/dashboard/applications/{client_id}", {"name": "Renamed"}),
        (f"/dashboard/applications/{client_id}/rotate-secret", {}),
        (f"/dashboard/applications/{client_id}/revoke-tokens", {}),
        (f"/dashboard/applications/{client_id}/client-auth",
         {"token_endpoint_auth_method": "client_secret_post", "dpop_bound_access_tokens": "true",
          "cc_token_limit": "3"}),
        (f"/dashboard/applications/{client_id}/keys", {"jwks": JWKS}),
        (f"/dashboard/applications/{client_id}/keys/remove", {"kid": "ec-1"}),
        (f"/dashboard/applications/{client_id}/delete", {}),
        (f"/dashboard/connections/{client_id}/revoke", {}),
        ("/dashboard/people", {"email": "new@acme.example", "role": "member"}),
        (f"/dashboard/people/{user_id}/role", {"role": "admin"}),
        (f"/dashboard/people/{user_id}/reset-password", {}),
        (f"/dashboard/people/{user_id}/remove", {}),
        ("/dashboard/keys", {"label": "forged"}),
        (f"/dashboard/keys/{key_id}/revoke", {}),
    ]  # fmt: skip


async def changed_objects(client, company) -> tuple[str, str, str]:
    """An application with a key, a member and an admin key: what the changes change."""
    app = await new_app(client, company, jwks={"keys": [REGISTERED.as_dict(private=False)]})
    member = await (
        await client.post(
            "/admin/users", json={"email": "clerk@acme.example", "role": "member"},
            headers=company.auth,
        )
    ).json()  # fmt: skip
    key = await (await client.post("/admin/keys", json={}, headers=company.auth)).json()
    return app["client_id"], member["user_id"], key["key_id"]


@pytest.mark.parametrize("token", ["none", "another session's", "garbage"])
async def test_a_change_without_the_sessions_token_changes_nothing(client, company, db, token):
    every = changes(*await changed_objects(client, company))
    # Another session of the same admin: its token is real, but not this session's.
    other = await client.post(
        "/session", json={"email": company.admin_email, "password": company.admin_password}
    )
    other_token = (await other.json())["csrf_token"]
    client.session.cookie_jar.clear()  # that session stays live, in no cookie of ours
    await sign_in(client, company.admin_email, company.admin_password)
    mine = await the_token(client)
    assert mine != other_token
    presented = {"none": {}, "another session's": {"csrf_token": other_token},
                 "garbage": {"csrf_token": "é" * 300}}[token]  # fmt: skip
    before = await events(db)
    for path, fields in every:
        response = await client.post(path, data=fields | presented, allow_redirects=False)
        assert response.status == 403, (path, await response.text())
        assert response.content_type == "text/html"
        assert "The form expired" in await response.text()
    # Bytes that are not UTF-8 where the token goes: a 403 too, never a 500.
    raw = await client.post(
        "/dashboard/keys", data=b"label=x&csrf_token=%ff%fe%ed%a0%80",
        headers={"Content-Type": "application/x-www-form-urlencoded"}, allow_redirects=False,
    )  # fmt: skip
    assert raw.status in (400, 403)
    assert await events(db) == before
    # The session still works, and its own token does change things.
    response = await client.post(
        "/dashboard/keys", data={"label": "real", "csrf_token": mine}, allow_redirects=False
    )
    assert response.status == 303
    assert await events(db) == before + 1


async def test_a_field_given_twice_changes_nothing(client, company, db):
    """A page acted on a repeated field's first value, where a proxy or a log that reads
    the last saw another request: `role=admin&role=member` added an admin. Only a list of
    checkboxes (an application's permissions) may repeat."""
    every = changes(*await changed_objects(client, company))
    await sign_in(client, company.admin_email, company.admin_password)
    token = await the_token(client)
    before = await events(db)
    for path, fields in every:
        pairs = [*fields.items(), ("csrf_token", token)]
        twice = next((k for k, _ in pairs if k != "permissions"), "csrf_token")
        pairs.append((twice, dict(pairs)[twice]))
        response = await client.post(path, data=pairs, allow_redirects=False)
        assert response.status == 400, (path, await response.text())
        assert f"{twice} is given more than once" in await response.text()
    assert await events(db) == before
    listed = await client.post(
        "/dashboard/applications",
        data=[("name", "Two permissions"), ("grant_type", "client_credentials"),
              ("ip_allowlist", "127.0.0.1"), ("notification_emails", "a@acme.example"),
              ("permissions", "invoices:read"), ("permissions", "debtors:read"),
              ("csrf_token", token)],
        allow_redirects=False,
    )  # fmt: skip
    assert listed.status == 303, await listed.text()
    assert await events(db) == before + 1


async def test_the_dashboards_token_works_for_the_admin_api(client, company):
    await sign_in(client, company.admin_email, company.admin_password)
    token = await the_token(client)
    refused = await client.post("/admin/keys", json={"label": "api"})
    assert refused.status == 403
    made = await client.post("/admin/keys", json={"label": "api"}, headers={"X-CSRF-Token": token})
    assert made.status == 201


async def test_members_and_other_companies_change_nothing(client, company, db):
    other = await make_company(client, "Globex")
    theirs = await new_app(client, other, name="Globex app")
    await sign_in(client, company.admin_email, company.admin_password)
    token = await the_token(client)
    for path in (f"/dashboard/applications/{theirs['client_id']}",
                 f"/dashboard/applications/{theirs['client_id']}/delete"):  # fmt: skip
        response = await client.get(path)
        assert response.status == 404
        assert "Globex" not in await response.text()
    before = await events(db)
    response = await client.post(
        f"/dashboard/applications/{theirs['client_id']}/delete",
        data={"csrf_token": token}, allow_redirects=False,
    )  # fmt: skip
    assert response.status == 404
    assert await events(db) == before

    made = await client.post(
        "/admin/users", json={"email": "clerk@acme.example", "role": "member"}, headers=company.auth
    )
    client.session.cookie_jar.clear()
    await sign_in(client, "clerk@acme.example", (await made.json())["password"])
    before = await events(db)
    response = await client.post(
        "/dashboard/keys", data={"label": "x", "csrf_token": token}, allow_redirects=False
    )
    assert response.status == 403
    assert "Only company admins" in await response.text()
    assert await events(db) == before


async def test_a_post_without_a_session_is_refused(client, company, db):
    before = await events(db)
    response = await client.post("/dashboard/keys", data={"label": "x"}, allow_redirects=False)
    assert response.status == 403
    assert await events(db) == before
