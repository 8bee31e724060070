"""Companies, users and admin keys; the command line; the SQL read models; and the proof
that no secret, key or password is kept or logged in clear."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import structlog

from service.app import CONTEXT, RUNNER
from tests.e2e.test_admin_applications import AC, CC, create

ALL_TABLES = (
    "events",
    "applications",
    "live_tokens",
    "companies",
    "users",
    "admin_keys",
    "web_sessions",
    "sign_in_choices",
    "projection_checkpoints",
    "event_stats",
)


async def everything_stored(db) -> str:
    parts = []
    for table in ALL_TABLES:
        parts.extend(str(tuple(row)) for row in await db.pool.fetch(f"SELECT * FROM {table}"))
    return "\n".join(parts)


async def caught_up(client) -> None:
    runner = client.app[RUNNER]
    for name in runner.projections:
        await runner.catch_up(name)


async def test_users_are_added_with_hashed_passwords(client, company, db):
    response = await client.post(
        "/admin/users", json={"email": "Clerk@Acme.example", "role": "member"}, headers=company.auth
    )
    assert response.status == 201
    body = await response.json()
    assert body["role"] == "member"
    assert len(body["password"]) >= 20  # generated, shown this once
    [added] = [
        r
        for r in await db.pool.fetch("SELECT * FROM events WHERE type = 'UserAdded'")
        if body["user_id"] in r["payload"]
    ]
    assert json.loads(added["payload"])["password_hash"].startswith("nfkc$argon2id$")
    assert body["password"] not in await everything_stored(db)
    listed = await (await client.get("/admin/users", headers=company.auth)).json()
    assert {u["email"] for u in listed["users"]} == {company.admin_email, "Clerk@acme.example"}
    login = await client.post(
        "/session", json={"email": "clerk@acme.example", "password": body["password"]}
    )
    assert login.status == 200


async def test_a_user_address_is_taken_once_even_concurrently(client, company, db):
    bodies = [
        {"email": "dup@acme.example", "role": "member", "password": f"long enough password {i}"}
        for i in range(4)
    ]
    responses = await asyncio.gather(
        *(client.post("/admin/users", json=b, headers=company.auth) for b in bodies)
    )
    assert sorted(r.status for r in responses) == [201, 409, 409, 409]
    assert (
        await db.pool.fetchval(
            "SELECT count(*) FROM events WHERE type = 'UserAdded' AND payload->>'email' = 'dup@acme.example'"
        )
        == 1
    )


async def test_bad_users_are_refused(client, company, db):
    for body, field in [
        ({"email": "x", "role": "member"}, "email"),
        ({"email": "a@acme.example", "role": "owner"}, "role"),
        ({"email": "a@acme.example", "role": "member", "password": "short"}, "password"),
        (
            {"email": "a@acme.example", "role": "member", "password": "password1234"},
            "password: password is too easy to guess: This is a very common password",
        ),
    ]:
        before = await db.pool.fetchval("SELECT count(*) FROM events")
        response = await client.post("/admin/users", json=body, headers=company.auth)
        assert response.status == 400
        assert field in (await response.json())["error_description"]
        assert await db.pool.fetchval("SELECT count(*) FROM events") == before


async def test_admin_keys_are_shown_once_and_can_be_revoked(client, company, db):
    response = await client.post("/admin/keys", json={"label": "deploy bot"}, headers=company.auth)
    assert response.status == 201
    made = await response.json()
    key_auth = {"Authorization": f"Bearer {made['admin_key']}"}
    assert made["admin_key"].startswith("tgadm_")
    assert (await client.get("/admin/applications", headers=key_auth)).status == 200
    assert made["admin_key"] not in await everything_stored(db)
    keys = await (await client.get("/admin/keys", headers=company.auth)).json()
    assert {k["label"] for k in keys["keys"]} == {"first admin key", "deploy bot"}
    assert "admin_key" not in str(keys)
    assert (
        await client.delete(f"/admin/keys/{made['key_id']}", headers=company.auth)
    ).status == 204
    assert (await client.get("/admin/applications", headers=key_auth)).status == 401


async def test_an_admin_key_label_with_a_control_character_is_refused(client, company, db):
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    for label in ("x\u0000y", "line\nbreak"):
        response = await client.post("/admin/keys", json={"label": label}, headers=company.auth)
        assert response.status == 400  # not a 503: the database is fine
        assert "label" in (await response.json())["error_description"]
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before


async def test_another_companys_key_cannot_be_revoked(client, company, other_company, db):
    theirs = await (await client.get("/admin/keys", headers=other_company.auth)).json()
    key_id = theirs["keys"][0]["key_id"]
    assert (await client.delete(f"/admin/keys/{key_id}", headers=company.auth)).status == 404
    assert (await client.get("/admin/applications", headers=other_company.auth)).status == 200


async def test_sql_read_models_show_companies_users_keys_and_applications(client, company, db):
    app = await create(client, company, CC)
    await create(client, company, AC)
    await client.patch(
        f"/admin/applications/{app['client_id']}", json={"name": "Renamed"}, headers=company.auth
    )
    await caught_up(client)
    assert (
        await db.pool.fetchval(
            "SELECT name FROM companies WHERE company_id = $1", company.company_id
        )
        == "Acme"
    )
    assert (
        await db.pool.fetchval("SELECT role FROM users WHERE email = $1", company.admin_email)
        == "admin"
    )
    assert (
        await db.pool.fetchval(
            "SELECT count(*) FROM admin_keys WHERE company_id = $1", company.company_id
        )
        == 1
    )
    row = await db.pool.fetchrow(
        "SELECT * FROM applications WHERE client_id = $1", app["client_id"]
    )
    assert row["name"] == "Renamed"
    assert row["ip_allowlist"] == ["192.0.2.10", "198.51.100.0/24"]
    assert row["version"] == 2
    assert (
        await db.pool.fetchval(
            "SELECT count(*) FROM applications WHERE company_id = $1", company.company_id
        )
        == 2
    )


async def test_no_secret_key_or_password_is_stored_or_logged_in_clear(client, company, db):
    with structlog.testing.capture_logs() as logs:
        app = await create(client, company, CC)
        rotated = await (
            await client.post(
                f"/admin/applications/{app['client_id']}/rotate-secret", headers=company.auth
            )
        ).json()
        user = await (
            await client.post(
                "/admin/users",
                json={"email": "b@acme.example", "role": "admin"},
                headers=company.auth,
            )
        ).json()
        login = await client.post(
            "/session", json={"email": "b@acme.example", "password": user["password"]}
        )
        session = (await login.json())["csrf_token"], login.cookies["tg_session"].value
        key = await (await client.post("/admin/keys", json={}, headers=company.auth)).json()
        await caught_up(client)
    secrets = [
        app["client_secret"],
        rotated["client_secret"],
        user["password"],
        *session,
        key["admin_key"],
        company.admin_key,
        company.admin_password,
    ]
    stored = await everything_stored(db)
    logged = repr(logs)
    assert len(logs) >= 5  # the requests were logged
    for secret in secrets:
        assert secret not in stored
        assert secret not in logged


def tollgate(db, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": db.dsn, "LOG_FORMAT": "json"}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_company_create_on_the_command_line(client, db):
    done = await asyncio.to_thread(
        tollgate, db, "company", "create", "Initech", "--admin-email", "boss@initech.example"
    )
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    assert set(made) >= {"company_id", "admin_key", "admin_password"}
    # the running service (another process) accepts the new key at once
    response = await client.get(
        "/admin/applications", headers={"Authorization": f"Bearer {made['admin_key']}"}
    )
    assert response.status == 200
    assert made["admin_key"] not in done.stderr and made["admin_password"] not in done.stderr
    assert made["admin_key"] not in await everything_stored(db)
    # The same address as another company's first admin: a separate account there, with
    # its own password (accounts are per company), and the first one is untouched.
    second = await asyncio.to_thread(
        tollgate, db, "company", "create", "Initech 2", "--admin-email", "boss@initech.example"
    )
    assert second.returncode == 0, second.stderr
    other = json.loads(second.stdout)
    assert other["company_id"] != made["company_id"]
    assert other["admin_user_id"] != made["admin_user_id"]
    for company in (made, other):
        login = await client.post(
            "/session",
            json={"email": "boss@initech.example", "password": company["admin_password"]},
        )
        assert login.status == 200, await login.text()
        assert (await login.json())["company_id"] == company["company_id"]


async def test_command_line_refuses_bad_input_with_one_line(db):
    done = await asyncio.to_thread(tollgate, db, "company", "create", "X", "--admin-email", "nope")
    assert done.returncode != 0
    assert "admin_email" in done.stderr
    assert "Traceback" not in done.stderr


async def test_context_is_wired(client):
    assert client.app[CONTEXT].catalogue["invoices:read"]


async def test_a_key_revoked_elsewhere_cannot_write_however_stale_this_process_is(
    client, company, db
):
    """Another process revoked the key; this one has not seen it yet. A change made with
    the key (say, minting a fresh key that would outlive it) must still be refused."""
    from service import events as ev
    from service.commands import directory
    from service.errors import Unauthorized
    from service.eventlog import EventLog, Metadata

    made = await (
        await client.post("/admin/keys", json={"label": "leaked"}, headers=company.auth)
    ).json()
    elsewhere = EventLog(db.pool)  # the other process's writer
    await elsewhere.start()
    try:
        await elsewhere.append(
            f"admin-key-{made['key_id']}",
            1,
            [ev.AdminKeyRevoked(company_id=company.company_id, key_id=made["key_id"])],
        )
    finally:
        await elsewhere.close()
    ctx = client.app[CONTEXT]
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    actor = Metadata(actor=f"admin_key:{made['key_id']}")
    with pytest.raises(Unauthorized):
        await directory.issue_admin_key(ctx, company.company_id, "successor", actor)
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before
