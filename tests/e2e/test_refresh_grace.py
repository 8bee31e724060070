"""A refresh repeated within REFRESH_REUSE_GRACE, over HTTP: a client's retry after a lost
answer, or two refreshes racing with one refresh token, gets a working pair and is
recorded; a repeat after the grace still revokes the whole grant (RFC 9700 §4.14.2)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from service.domain import grants
from service.oauth import tokens
from tests.e2e.oauth_helpers import basic, code_for, new_app

GRACE = 2  # seconds; whole seconds are compared, so a prompt retry is within it


@pytest.fixture
def settings(settings):
    return dataclasses.replace(settings, refresh_reuse_grace=GRACE)


async def post_token(client, app, **data):
    return await client.post(
        "/oauth/token", data=data, headers=basic(app["client_id"], app["client_secret"])
    )


async def a_grant(client, company) -> tuple[dict, dict]:
    app = await new_app(client, company, grant_type="authorization_code", ip_allowlist=[])
    code = await code_for(client, company, app)
    response = await post_token(
        client, app, grant_type="authorization_code", code=code, redirect_uri=app["redirect_uri"]
    )
    assert response.status == 200, await response.text()
    return app, await response.json()


async def refresh(client, app, refresh_token):
    return await post_token(client, app, grant_type="refresh_token", refresh_token=refresh_token)


async def whoami(client, access_token) -> int:
    response = await client.get(
        "/api/v1/whoami", headers={"Authorization": f"Bearer {access_token}"}
    )
    return response.status


async def payloads(db, type_: str) -> list[dict]:
    rows = await db.pool.fetch(
        "SELECT payload FROM events WHERE type = $1 ORDER BY position", type_
    )
    return [json.loads(row["payload"]) for row in rows]


async def test_concurrent_refreshes_with_one_refresh_token_both_succeed_and_the_grant_lives(
    client, company, db
):
    app, first = await a_grant(client, company)
    answers = await asyncio.gather(
        *(refresh(client, app, first["refresh_token"]) for _ in range(2))
    )
    assert [a.status for a in answers] == [200, 200], [await a.text() for a in answers]
    one, two = [await a.json() for a in answers]
    assert one["refresh_token"] != two["refresh_token"]
    assert await whoami(client, one["access_token"]) == 200
    assert await whoami(client, two["access_token"]) == 200
    refreshed = await payloads(db, "TokenRefreshed")
    assert [p["grace_reuse"] for p in refreshed] == [False, True]  # the repeat is recorded
    assert await payloads(db, "TokenRevoked") == []
    # the family has one live refresh token, the newest, and it rotates as usual
    [newest] = [
        b
        for b in (one, two)
        if tokens.token_hash(b["refresh_token"]) == refreshed[1]["refresh_token_hash"]
    ]
    assert (await refresh(client, app, newest["refresh_token"])).status == 200


async def test_as_many_concurrent_refreshes_as_the_grace_allows_all_succeed(client, company, db):
    """One refresh and GRACE_REPEATS repeats at once: each request that loses the race to a
    winner it can see decides again, however many races that takes; only a winner it
    cannot see makes it a reuse."""
    app, first = await a_grant(client, company)
    answers = await asyncio.gather(
        *(refresh(client, app, first["refresh_token"]) for _ in range(1 + grants.GRACE_REPEATS))
    )
    assert [a.status for a in answers] == [200] * (1 + grants.GRACE_REPEATS), [
        await a.text() for a in answers
    ]
    refreshed = await payloads(db, "TokenRefreshed")
    assert [p["grace_reuse"] for p in refreshed] == [False] + [True] * grants.GRACE_REPEATS
    assert await payloads(db, "TokenRevoked") == []
    for answer in answers:
        assert await whoami(client, (await answer.json())["access_token"]) == 200


async def test_a_retry_within_the_grace_works_and_one_after_it_revokes_the_grant(
    client, company, db
):
    app, first = await a_grant(client, company)
    second = await refresh(client, app, first["refresh_token"])
    assert second.status == 200
    retry = await refresh(client, app, first["refresh_token"])  # the answer was lost
    assert retry.status == 200, await retry.text()
    live = await retry.json()
    assert await whoami(client, live["access_token"]) == 200

    await asyncio.sleep(GRACE + 1.1)
    late = await refresh(client, app, first["refresh_token"])
    assert late.status == 400
    assert (await late.json())["error"] == "invalid_grant"
    assert await whoami(client, live["access_token"]) == 401  # the whole grant is gone
    assert (await refresh(client, app, live["refresh_token"])).status == 400
    assert [p["reason"] for p in await payloads(db, "TokenRevoked")] == ["refresh_reuse"]
    [reused] = await payloads(db, "RefreshTokenReused")
    assert reused["refresh_token_hash"] == tokens.token_hash(first["refresh_token"])


@pytest.mark.parametrize("kept", [0, 1])
async def test_after_a_race_the_answer_the_client_kept_refreshes_after_the_grace(
    client, company, db, kept
):
    """Of two answers to a race, the client cannot tell which holds the live refresh
    token. Before, the one the repeat had rotated away revoked the whole grant when it was
    presented after the grace: half the time, for a client that did nothing wrong. Now the
    first presented rotates, and spends the other (a repeat within the grace, a reuse
    after it)."""
    app, first = await a_grant(client, company)
    answers = await asyncio.gather(
        *(refresh(client, app, first["refresh_token"]) for _ in range(2))
    )
    assert [a.status for a in answers] == [200, 200]
    bodies = [await a.json() for a in answers]
    # introspection, asked by the client, says the kept one is good (it is)
    introspected = await client.post(
        "/oauth/introspect",
        data={"token": bodies[kept]["refresh_token"]},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert (await introspected.json())["active"] is True
    await asyncio.sleep(GRACE + 1.1)
    later = await refresh(client, app, bodies[kept]["refresh_token"])
    assert later.status == 200, await later.text()
    assert await payloads(db, "TokenRevoked") == []
    renewed = await later.json()
    assert await whoami(client, renewed["access_token"]) == 200
    await asyncio.sleep(GRACE + 1.1)
    other = await refresh(client, app, bodies[1 - kept]["refresh_token"])
    assert other.status == 400
    assert (await other.json())["error"] == "invalid_grant"
    assert [p["reason"] for p in await payloads(db, "TokenRevoked")] == ["refresh_reuse"]
    assert await whoami(client, renewed["access_token"]) == 401


async def test_both_answers_of_a_race_presented_are_two_holders_and_revoke_the_grant(
    client, company, db
):
    """Whichever comes first rotates; the other, presented too, is a second holder of one
    grant (RFC 9700 §4.14.2), within the grace as after it: the grace a rotation opens
    covers only a retry of what that rotation spent, so two holders cannot take turns."""
    app, first = await a_grant(client, company)
    bodies = [
        await a.json()
        for a in await asyncio.gather(
            *(refresh(client, app, first["refresh_token"]) for _ in range(2))
        )
    ]
    again = [await refresh(client, app, b["refresh_token"]) for b in bodies]
    assert [a.status for a in again] == [200, 400], [await a.text() for a in again]
    assert [p["reason"] for p in await payloads(db, "TokenRevoked")] == ["refresh_reuse"]
