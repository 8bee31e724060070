"""SPEC §2 rules that a mutation audit showed no test would catch if they broke: each
test here fails when its rule is broken (the mutant named in its docstring)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from service.app import CONTEXT
from service.commands.directory import register_resource_server
from service.eventlog import Metadata
from tests.e2e.oauth_helpers import authorize_url, basic, code_for, new_app
from tests.e2e.test_oauth_flows import exchange, introspect, refresh


@pytest.fixture
def settings(settings):
    """No refresh-reuse grace here: these tests pin what reuse does once it has passed
    (test_refresh_grace.py covers the grace itself)."""
    return dataclasses.replace(settings, refresh_reuse_grace=0)


def bearer(t):
    return {"Authorization": f"Bearer {t}"}


async def ac(client, company, **kw):
    return await new_app(client, company, grant_type="authorization_code", ip_allowlist=[], **kw)


async def test_a_name_of_exactly_100_characters_is_accepted(client, company):
    await new_app(client, company, name="x" * 100)


async def test_http_redirect_uris_are_for_loopback_hosts_not_lookalikes(client, company):
    for uri in ("http://localhost.evil.example/cb", "http://127.0.0.1.evil.example/cb"):
        body = {
            "name": "a",
            "grant_type": "authorization_code",
            "redirect_uri": uri,
            "permissions": ["invoices:read"],
        }
        r = await client.post("/admin/applications", json=body, headers=company.auth)
        assert r.status == 400, uri


async def test_the_first_and_last_addresses_of_a_cidr_range_are_inside_it(client, company):
    app = await new_app(client, company, ip_allowlist=["127.0.0.1", "192.0.2.0/24"])
    token = (
        await (
            await client.post(
                "/oauth/token",
                data={"grant_type": "client_credentials"},
                headers=basic(app["client_id"], app["client_secret"]),
            )
        ).json()
    )["access_token"]
    _, key = await register_resource_server(client.app[CONTEXT], "rs", Metadata())
    for ip in ("192.0.2.0", "192.0.2.255"):
        r = await client.post("/policy/check", json={"token": token, "ip": ip}, headers=bearer(key))
        assert r.status == 200, ip


async def test_authorize_refuses_a_redirect_uri_that_only_starts_like_the_registered_one(
    client, company
):
    app = await ac(client, company)
    url = authorize_url(app | {"redirect_uri": app["redirect_uri"] + "&next=https://evil.example"})
    r = await client.get(url, allow_redirects=False)
    assert r.status == 400 and "Location" not in r.headers


async def test_an_authorization_code_access_token_dies_after_two_hours(
    client, company, monkeypatch
):
    app = await ac(client, company)
    body = await (await exchange(client, app, await code_for(client, company, app))).json()
    assert (await client.get("/api/v1/whoami", headers=bearer(body["access_token"]))).status == 200
    real = time.time
    monkeypatch.setattr(client.app[CONTEXT].policy_point, "clock", lambda: real() + 7200 + 5)
    assert (await client.get("/api/v1/whoami", headers=bearer(body["access_token"]))).status == 401


async def test_a_refreshed_access_token_dies_after_two_hours(client, company, monkeypatch):
    app = await ac(client, company)
    first = await (await exchange(client, app, await code_for(client, company, app))).json()
    body = await (await refresh(client, app, first["refresh_token"])).json()
    real = time.time
    monkeypatch.setattr(client.app[CONTEXT].policy_point, "clock", lambda: real() + 7200 + 5)
    assert (await client.get("/api/v1/whoami", headers=bearer(body["access_token"]))).status == 401


async def test_a_spent_refresh_token_is_refused_once_every_model_has_seen_it(client, company):
    app = await ac(client, company)
    first = await (await exchange(client, app, await code_for(client, company, app))).json()
    assert (await refresh(client, app, first["refresh_token"])).status == 200
    await client.app[CONTEXT].refresh()
    again = await refresh(client, app, first["refresh_token"])
    assert again.status == 400


async def test_an_authorization_code_app_may_not_use_client_credentials(client, company):
    app = await ac(client, company)
    r = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert r.status == 400
    assert (await r.json())["error"] == "unauthorized_client"


async def test_a_client_credentials_app_cannot_be_connected_through_authorize(client, company):
    app = await new_app(client, company, redirect_uri="https://cc.example/cb")
    r = await client.get(authorize_url(app), allow_redirects=False)
    assert r.status == 400


async def test_rotating_the_secret_keeps_authorization_code_tokens_and_their_refresh(
    client, company
):
    app = await ac(client, company)
    body = await (await exchange(client, app, await code_for(client, company, app))).json()
    rotated = await (
        await client.post(
            f"/admin/applications/{app['client_id']}/rotate-secret", headers=company.auth
        )
    ).json()
    app2 = app | {"client_secret": rotated["client_secret"]}
    assert (await introspect(client, app2, body["access_token"]))["active"] is True
    assert (await refresh(client, app2, body["refresh_token"])).status == 200


async def test_deleting_an_application_ends_its_user_tokens_and_connections(
    client, company, other_company
):
    app = await ac(client, company)
    body = await (await exchange(client, app, await code_for(client, other_company, app))).json()
    _, key = await register_resource_server(client.app[CONTEXT], "rs", Metadata())
    r = await client.delete(f"/admin/applications/{app['client_id']}", headers=company.auth)
    assert r.status == 204
    info = await (
        await client.post(
            "/oauth/introspect", data={"token": body["access_token"]}, headers=bearer(key)
        )
    ).json()
    assert info == {"active": False}
    conns = await (await client.get("/admin/connections", headers=other_company.auth)).json()
    assert conns == {"connections": []}
