"""client_credentials tokens never expire, so their number is bounded over HTTP: past
CC_TOKEN_LIMIT live tokens an application's oldest is superseded (recorded, and refused at
the gateway), and a client asking faster than TOKEN_RATE_PER_CLIENT gets 429 slow_down
with Retry-After."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from service.app import CONTEXT
from service.domain import streams
from service.oauth import tokens
from tests.e2e.oauth_helpers import basic, cc_token, new_app

LIMIT = 3
BURST = 6


@pytest.fixture
def settings(settings):
    return dataclasses.replace(
        settings, cc_token_limit=LIMIT, token_rate_per_client=1, token_rate_burst=BURST
    )


async def whoami(client, access_token) -> int:
    response = await client.get(
        "/api/v1/whoami", headers={"Authorization": f"Bearer {access_token}"}
    )
    return response.status


async def issued_one_by_one(client, app, count) -> list[str]:
    out = []
    for _ in range(count):
        out.append((await cc_token(client, app))["access_token"])
        # issuing does not wait for this process's model to apply the token; its feed
        # follows within milliseconds, which the next request (here, a moment later) sees
        await client.app[CONTEXT].refresh()
    return out


async def test_past_the_limit_the_oldest_token_is_superseded_and_refused_at_the_gateway(
    client, company, db
):
    app = await new_app(client, company)
    first = await issued_one_by_one(client, app, LIMIT)
    assert [await whoami(client, t) for t in first] == [200] * LIMIT
    [newest] = await issued_one_by_one(client, app, 1)
    assert await whoami(client, first[0]) == 401
    assert [await whoami(client, t) for t in [*first[1:], newest]] == [200] * LIMIT
    rows = await db.pool.fetch(
        "SELECT stream_id, payload FROM events WHERE type = 'TokenRevoked' ORDER BY position"
    )
    [(stream_id, payload)] = [(r["stream_id"], json.loads(r["payload"])) for r in rows]
    family = streams.lone_family(tokens.token_hash(first[0]))
    assert payload["reason"] == "superseded" and payload["family_id"] == family
    assert stream_id == streams.token_family(family)
    assert payload["client_id"] == app["client_id"]


async def test_a_client_past_its_rate_gets_429_slow_down_with_retry_after(client, company, db):
    app = await new_app(client, company)
    other = await new_app(client, company)
    for _ in range(BURST):
        await cc_token(client, app)
    refused = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert refused.status == 429
    assert (await refused.json())["error"] == "slow_down"
    retry_after = int(refused.headers["Retry-After"])
    assert retry_after >= 1
    assert refused.headers["Cache-Control"] == "no-store"
    issued = "SELECT count(*) FROM events WHERE type = 'AccessTokenIssued' AND stream_id LIKE $1"
    assert await cc_token(client, other)  # each client has its own rate
    await asyncio.sleep(retry_after)
    assert await cc_token(client, app)
    assert await db.pool.fetchval(issued, "%") == BURST + 2  # the refused one recorded nothing


async def test_a_burst_past_the_limit_is_brought_back_to_it(client, company, db):
    """Asked for at once, each token was decided on a view without the others, and all
    stayed live (they never expire) until the client asked again. Counted again once
    they are applied, the excess is superseded within a moment."""
    app = await new_app(client, company)
    burst = await asyncio.gather(*(cc_token(client, app) for _ in range(BURST)))
    issued = [b["access_token"] for b in burst]

    async def live() -> int:
        return [await whoami(client, t) for t in issued].count(200)

    for _ in range(100):
        if await live() == LIMIT:
            break
        await asyncio.sleep(0.05)
    assert await live() == LIMIT
    superseded = await db.pool.fetch(
        "SELECT DISTINCT payload::jsonb->>'family_id' AS family FROM events "
        "WHERE type = 'TokenRevoked' AND payload::jsonb->>'reason' = 'superseded'"
    )
    assert len(superseded) == BURST - LIMIT
