"""Two `tollgate serve` processes on one database hold one limit between them, not one
each: failed sign-ins are counted in PostgreSQL, and each process takes the tokens the other
grants from a client's rate as its read model applies them."""

from __future__ import annotations

import asyncio
import time

from tests.e2e.oauth_helpers import basic
from tests.e2e.test_scale_out import a_company, cc_app, serving, until

LIMIT = 5  # per address and caller, in 15 minutes


async def sign_in(http, email: str, password: str) -> int:
    async with http.post("/session", json={"email": email, "password": password}) as response:
        return response.status


async def test_two_processes_share_one_sign_in_limit(db, tmp_path):
    company = await a_company(db, tmp_path)
    email, password = company.admin_email, company.admin_password
    async with serving(db) as (a, _), serving(db) as (b, _):
        statuses = [await sign_in((a, b)[i % 2], email, "wrong guess") for i in range(LIMIT + 3)]
        assert statuses == [401] * LIMIT + [429] * 3
        # the right password too, from either process, until the window passes
        assert await sign_in(a, email, password) == 429
        assert await sign_in(b, email, password) == 429
        async with a.post("/session", json={"email": email, "password": "x"}) as response:
            assert 1 <= int(response.headers["Retry-After"]) <= 900
    keys = [row["key"] for row in await db.pool.fetch("SELECT key FROM sign_in_failures")]
    assert sorted(keys) == sorted([f"{email}|127.0.0.1", f"{email}|*"])
    stored = await db.pool.fetch("SELECT * FROM sign_in_failures")
    assert not any("wrong guess" in str(dict(row)) or password in str(dict(row)) for row in stored)


async def test_concurrent_guesses_through_two_processes_cannot_slip_past_the_limit(db, tmp_path):
    company = await a_company(db, tmp_path)
    async with serving(db) as (a, _), serving(db) as (b, _):
        statuses = await asyncio.gather(
            *(sign_in((a, b)[i % 2], company.admin_email, f"guess {i}") for i in range(16))
        )
    assert sorted(statuses) == [401] * LIMIT + [429] * (16 - LIMIT)


async def test_a_successful_sign_in_takes_its_count_back_in_every_process(db, tmp_path):
    company = await a_company(db, tmp_path)
    email, password = company.admin_email, company.admin_password
    async with serving(db) as (a, _), serving(db) as (b, _):
        for i in range(LIMIT - 1):
            assert await sign_in((a, b)[i % 2], email, "wrong") == 401
        assert await sign_in(a, email, password) == 200  # counted first, then withdrawn
        assert await sign_in(b, email, "wrong") == 401  # the fifth failure
        assert await sign_in(a, email, "wrong") == 429


async def test_two_processes_share_one_client_credentials_rate(db, tmp_path):
    """Asked of each process in turn, each one once the other's last token is in its read
    model (its gateway takes it): one bucket of BURST, refilled at one a second, grants at
    most BURST plus a token a second between the two. One bucket each granted 2 BURST."""
    burst = 4
    company = await a_company(db, tmp_path)
    limits = {"TOKEN_RATE_PER_CLIENT": "1", "TOKEN_RATE_BURST": str(burst)}
    async with serving(db, **limits) as (a, _), serving(db, **limits) as (b, _):
        app = await cc_app(a, company, "Shared rate")
        creds = basic(app["client_id"], app["client_secret"])
        statuses = []
        started = time.monotonic()
        for i in range(4 * burst):
            asked, other = (a, b) if i % 2 == 0 else (b, a)
            form = {"grant_type": "client_credentials"}
            async with asked.post("/oauth/token", data=form, headers=creds) as response:
                statuses.append(response.status)
                body = await response.json()
            if response.status == 429:
                assert body["error"] == "slow_down"
                continue
            bearer = {"Authorization": f"Bearer {body['access_token']}"}

            async def seen(other=other, bearer=bearer) -> bool:
                async with other.get("/api/v1/whoami", headers=bearer) as r:
                    return r.status == 200

            await until(seen)
        elapsed = time.monotonic() - started
    granted = statuses.count(200)
    assert statuses[:burst] == [200] * burst, statuses
    assert granted <= burst + int(elapsed), (statuses, elapsed)
    assert set(statuses) == {200, 429}


async def test_a_burst_through_two_processes_is_brought_back_to_the_live_token_limit(db, tmp_path):
    """Each process decided its tokens on a view without the other's: together they
    passed CC_TOKEN_LIMIT. Each counts again once its own are applied, the other's with
    them, and the excess is superseded (twice over at worst, never past the oldest)."""
    limit = 5
    company = await a_company(db, tmp_path)
    limits = {"CC_TOKEN_LIMIT": str(limit), "TOKEN_RATE_PER_CLIENT": "0"}
    async with serving(db, **limits) as (a, _), serving(db, **limits) as (b, _):
        app = await cc_app(a, company, "Shared limit")
        creds = basic(app["client_id"], app["client_secret"])

        async def issued(http) -> str:
            form = {"grant_type": "client_credentials"}
            async with http.post("/oauth/token", data=form, headers=creds) as response:
                assert response.status == 200
                return (await response.json())["access_token"]

        burst = await asyncio.gather(*(issued((a, b)[i % 2]) for i in range(20)))

        async def live(http) -> int:
            statuses = []
            for token in burst:
                bearer = {"Authorization": f"Bearer {token}"}
                async with http.get("/api/v1/whoami", headers=bearer) as r:
                    statuses.append(r.status)
            return statuses.count(200)

        async def at_the_limit() -> bool:
            return await live(a) == limit and await live(b) == limit

        await until(at_the_limit, seconds=10)
