"""A client_credentials application's own bound on its live tokens (`cc_token_limit`),
over HTTP: set on creation or by PATCH, recorded as an event, used by the token endpoint
in place of CC_TOKEN_LIMIT, and cleared back to the setting with null."""

from __future__ import annotations

import dataclasses
import json

import pytest

from service.app import CONTEXT
from tests.e2e.oauth_helpers import cc_token, new_app
from tests.e2e.test_admin_people import caught_up

SETTING = 5


@pytest.fixture
def settings(settings):
    return dataclasses.replace(settings, cc_token_limit=SETTING, token_rate_burst=100)


async def issue(client, app, count) -> list[str]:
    out = []
    for _ in range(count):
        out.append((await cc_token(client, app))["access_token"])
        await client.app[CONTEXT].refresh()
    return out


async def superseded(db) -> int:
    return await db.pool.fetchval(
        "SELECT count(*) FROM events WHERE type = 'TokenRevoked' "
        "AND payload::jsonb ->> 'reason' = 'superseded'"
    )


async def whoami(client, token) -> int:
    response = await client.get("/api/v1/whoami", headers={"Authorization": f"Bearer {token}"})
    return response.status


async def test_an_application_limit_set_on_creation_replaces_the_setting(client, company, db):
    app = await new_app(client, company, cc_token_limit=2)
    assert app["cc_token_limit"] == 2
    [first, second, third] = await issue(client, app, 3)
    assert await superseded(db) == 1
    assert await whoami(client, first) == 401
    assert await whoami(client, second) == 200
    assert await whoami(client, third) == 200
    [event] = await db.pool.fetch("SELECT payload FROM events WHERE type = 'CcTokenLimitChanged'")
    assert json.loads(event["payload"])["after"] == 2


async def test_patch_sets_the_limit_and_null_gives_back_the_setting(client, company, db):
    app = await new_app(client, company)
    assert app["cc_token_limit"] is None
    url = f"/admin/applications/{app['client_id']}"
    patched = await client.patch(url, json={"cc_token_limit": 1}, headers=company.auth)
    assert patched.status == 200
    assert (await patched.json())["cc_token_limit"] == 1
    await issue(client, app, 3)
    assert await superseded(db) == 2  # each new token supersedes the one before
    cleared = await client.patch(url, json={"cc_token_limit": None}, headers=company.auth)
    assert (await cleared.json())["cc_token_limit"] is None
    await issue(client, app, SETTING - 1)
    assert await superseded(db) == 2  # the setting's 5 now: 1 + 4 live, none superseded
    await issue(client, app, 1)
    assert await superseded(db) == 3
    rows = await db.pool.fetch(
        "SELECT payload FROM events WHERE type = 'CcTokenLimitChanged' ORDER BY position"
    )
    assert [
        (json.loads(r["payload"])["before"], json.loads(r["payload"])["after"]) for r in rows
    ] == [
        (None, 1),
        (1, None),
    ]
    await caught_up(client)  # the applications table is a projection: it follows the log
    column = await db.pool.fetchval(
        "SELECT cc_token_limit FROM applications WHERE client_id = $1", app["client_id"]
    )
    assert column is None


async def test_zero_lifts_the_bound_for_that_application_alone(client, company, db):
    app = await new_app(client, company, cc_token_limit=0)
    await issue(client, app, SETTING + 2)
    assert await superseded(db) == 0


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"cc_token_limit": -1}, "cc_token_limit"),
        ({"cc_token_limit": "ten"}, "cc_token_limit"),
        (
            {"grant_type": "authorization_code", "ip_allowlist": [], "cc_token_limit": 3},
            "client_credentials applications only",
        ),
    ],
)
async def test_a_bad_limit_is_a_400(client, company, fields, words):
    body = {
        "name": "Sync",
        "grant_type": "client_credentials",
        "ip_allowlist": ["127.0.0.1"],
        "permissions": ["invoices:read"],
        "notification_emails": ["ops@acme.example"],
        "redirect_uri": "https://app.example/cb",
    } | fields
    response = await client.post("/admin/applications", json=body, headers=company.auth)
    assert response.status == 400
    assert words in (await response.json())["error_description"]
