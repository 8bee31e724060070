"""A restart of the service starts its models from the newest snapshot and the log after
it: every token issued before and after the snapshot works, a revocation after it holds,
and the snapshot holds no secret or token in clear."""

from __future__ import annotations

import base64

from aiohttp.test_utils import TestClient, TestServer

from projections import snapshots
from service.app import CONTEXT, EVENTLOG, RUNNER, create_app
from service.storage.database import Database
from tests.e2e.oauth_helpers import basic, cc_token, new_app


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_restart_from_a_snapshot_keeps_every_token_and_every_revocation(
    client, company, db, settings, monkeypatch
):
    app = await new_app(client, company)
    before = [(await cc_token(client, app))["access_token"] for _ in range(3)]
    # The service writes them beside its projections, every 300 s once the log has grown by
    # 10,000 events: here one is written at once, as that writer would.
    default = client.app[RUNNER].snapshots
    assert default is not None and (default.every, default.min_events) == (300, 10_000)
    writer = snapshots.SnapshotWriter(
        client.app[EVENTLOG], db.pool, db.dsn, every=3600, min_events=1
    )
    written = await writer.write_once()
    assert written == await client.app[EVENTLOG].head()
    after = (await cc_token(client, app))["access_token"]
    revoked = await client.post(
        "/oauth/revoke", data={"token": before[0]},
        headers=basic(app["client_id"], app["client_secret"]),
    )  # fmt: skip
    assert revoked.status == 200

    data = b"".join(r["data"] for r in await db.pool.fetch("SELECT data FROM model_snapshots"))
    for secret in [app["client_secret"], *before, after]:
        for form in (secret.encode(), base64.b64encode(secret.encode())):
            assert form not in data

    loaded: list[snapshots.Restored | None] = []
    load = snapshots.load

    async def spied(pool):
        loaded.append(await load(pool))
        return loaded[-1]

    monkeypatch.setattr(snapshots, "load", spied)
    restarted = TestClient(TestServer(create_app(settings, database=Database(db.dsn, db.pool))))
    await restarted.start_server()
    try:
        [restored] = loaded
        assert restored is not None and restored.position == written
        policy = restarted.app[CONTEXT].policy
        assert policy is restored.policy
        assert policy.position == await client.app[EVENTLOG].head()
        statuses = [
            (await restarted.get("/api/v1/whoami", headers=bearer(t))).status
            for t in [*before, after]
        ]
        assert statuses == [401, 200, 200, 200]
    finally:
        await restarted.close()


async def test_a_restart_without_a_snapshot_starts_from_the_log(client, company, db, settings):
    app = await new_app(client, company)
    issued = (await cc_token(client, app))["access_token"]
    assert await db.pool.fetchval("SELECT count(*) FROM model_snapshots") == 0
    restarted = TestClient(TestServer(create_app(settings, database=Database(db.dsn, db.pool))))
    await restarted.start_server()
    try:
        assert (await restarted.get("/api/v1/whoami", headers=bearer(issued))).status == 200
    finally:
        await restarted.close()
