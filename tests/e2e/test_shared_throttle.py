"""Failed sign-ins are counted in PostgreSQL: two `tollgate serve` processes on one database
hold one limit between them, not one each."""

from __future__ import annotations

import asyncio

from tests.e2e.test_scale_out import a_company, serving

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
