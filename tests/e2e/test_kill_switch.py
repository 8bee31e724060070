"""The kill switch: POST /admin/applications/{client_id}/revoke-tokens revokes every live
token of an application and keeps its client_id and secret (a leaked never-expiring
client_credentials token no longer needs the application deleted)."""

from __future__ import annotations

from service.audit.replay import replay
from tests.e2e.oauth_helpers import (
    authorize_url,
    basic,
    cc_token,
    code_for,
    consent,
    new_app,
    query_of,
)
from tests.e2e.test_admin_people import caught_up
from tests.e2e.test_oauth_flows import exchange


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def whoami(client, token: str) -> int:
    return (await client.get("/api/v1/whoami", headers=bearer(token))).status


async def signed_in_code(client, app) -> str:
    return query_of(await consent(client, authorize_url(app)))["code"]


async def kill(client, company, app) -> object:
    return await client.post(
        f"/admin/applications/{app['client_id']}/revoke-tokens", headers=company.auth
    )


async def test_every_live_token_dies_and_the_credentials_stay(client, company, db):
    app = await new_app(client, company)
    leaked = [(await cc_token(client, app))["access_token"] for _ in range(3)]
    assert [await whoami(client, t) for t in leaked] == [200, 200, 200]
    response = await kill(client, company, app)
    assert response.status == 200, await response.text()
    assert await response.json() == {"client_id": app["client_id"], "revoked": 3}
    assert [await whoami(client, t) for t in leaked] == [401, 401, 401]
    fresh = (await cc_token(client, app))["access_token"]  # same client_id and secret
    assert await whoami(client, fresh) == 200
    [event] = await db.pool.fetch(
        "SELECT stream_id, payload->>'client_id' AS client_id FROM events "
        "WHERE type = 'ApplicationTokensRevoked'"
    )
    assert (event["stream_id"], event["client_id"]) == (
        f"application-{app['client_id']}",
        app["client_id"],
    )
    await caught_up(client)
    live = await db.pool.fetchval(
        "SELECT count(*) FROM live_tokens WHERE client_id = $1", app["client_id"]
    )
    assert live == 1
    head = await db.pool.fetchval("SELECT max(position) FROM events")
    assert len((await replay(db.pool, head)).tokens) == 1  # a replay agrees
    got = await client.get(f"/admin/applications/{app['client_id']}", headers=company.auth)
    assert got.status == 200
    # the stream moved: the ETag and the applications table both name its new version
    stream_version = await db.pool.fetchval(
        "SELECT max(version) FROM events WHERE stream_id = $1", f"application-{app['client_id']}"
    )
    assert got.headers["ETag"] == f'"{stream_version}"'
    table_version = await db.pool.fetchval(
        "SELECT version FROM applications WHERE client_id = $1", app["client_id"]
    )
    assert table_version == stream_version


async def test_refresh_tokens_and_codes_not_yet_redeemed_die_too(client, company):
    app = await new_app(client, company, grant_type="authorization_code")
    tokens = await (await exchange(client, app, await code_for(client, company, app))).json()
    pending = await signed_in_code(client, app)
    assert (await kill(client, company, app)).status == 200
    assert await whoami(client, tokens["access_token"]) == 401
    refreshed = await client.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert refreshed.status == 400 and (await refreshed.json())["error"] == "invalid_grant"
    redeemed = await exchange(client, app, pending)
    assert redeemed.status == 400 and (await redeemed.json())["error"] == "invalid_grant"
    # the connection stays: the user's next consent works without more ado
    after = await exchange(client, app, await signed_in_code(client, app))
    assert after.status == 200


async def test_another_companys_application_is_not_found(client, company, other_company, db):
    theirs = await new_app(client, other_company)
    token = (await cc_token(client, theirs))["access_token"]
    assert (await kill(client, company, theirs)).status == 404
    assert await whoami(client, token) == 200
    assert (
        await db.pool.fetchval(
            "SELECT count(*) FROM events WHERE type = 'ApplicationTokensRevoked'"
        )
        == 0
    )
