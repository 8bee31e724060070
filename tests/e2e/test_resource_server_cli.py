"""`tollgate resource-server list` and `revoke`: the keys SPEC says are revocable are, and
the running service (another process) refuses a revoked key."""

from __future__ import annotations

import asyncio
import json

from tests.e2e.oauth_helpers import cc_token, new_app
from tests.e2e.test_admin_people import tollgate


async def introspect(client, key: str, token: str) -> int:
    response = await client.post(
        "/oauth/introspect", data={"token": token}, headers={"Authorization": f"Bearer {key}"}
    )
    return response.status


async def test_resource_servers_are_listed_without_keys_and_revoked(client, company, db):
    made = []
    for name in ("invoices api", "ledger api"):
        done = await asyncio.to_thread(tollgate, db, "resource-server", "create", name)
        assert done.returncode == 0, done.stderr
        made.append(json.loads(done.stdout))
    token = (await cc_token(client, await new_app(client, company)))["access_token"]
    assert await introspect(client, made[0]["key"], token) == 200
    revoked = await asyncio.to_thread(
        tollgate, db, "resource-server", "revoke", made[0]["resource_server_id"]
    )
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout) == {
        "resource_server_id": made[0]["resource_server_id"],
        "revoked": True,
    }
    for _ in range(50):  # another process's revocation, seen within a bound
        if await introspect(client, made[0]["key"], token) == 401:
            break
        await asyncio.sleep(0.1)
    assert await introspect(client, made[0]["key"], token) == 401
    assert await introspect(client, made[1]["key"], token) == 200
    listed = await asyncio.to_thread(tollgate, db, "resource-server", "list")
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert lines == [
        {"resource_server_id": made[0]["resource_server_id"], "name": "invoices api",
         "revoked": True},
        {"resource_server_id": made[1]["resource_server_id"], "name": "ledger api",
         "revoked": False},
    ]  # fmt: skip
    assert all(m["key"] not in listed.stdout for m in made)
    events = await db.pool.fetch(
        "SELECT stream_id FROM events WHERE type = 'ResourceServerKeyRevoked'"
    )
    assert [e["stream_id"] for e in events] == [f"resource-server-{made[0]['resource_server_id']}"]


async def test_revoking_twice_is_harmless_and_an_unknown_id_is_one_line(db):
    made = json.loads(
        (await asyncio.to_thread(tollgate, db, "resource-server", "create", "api")).stdout
    )
    server = made["resource_server_id"]
    for _ in range(2):
        done = await asyncio.to_thread(tollgate, db, "resource-server", "revoke", server)
        assert done.returncode == 0, done.stderr
    unknown = await asyncio.to_thread(tollgate, db, "resource-server", "revoke", "rs_nope")
    assert unknown.returncode != 0
    assert unknown.stderr.strip().count("\n") == 0 and "rs_nope" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    count = await db.pool.fetchval(
        "SELECT count(*) FROM events WHERE type = 'ResourceServerKeyRevoked'"
    )
    assert count == 1
