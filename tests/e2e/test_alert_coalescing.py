"""A flood of refused attempts that revokes nothing (a valid secret from a disallowed
address, a rotated-away secret) is one event per application, address and window, and a
count; the log keeps how many, the first and the last."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.alerts import CoalescingLedger
from service.app import CONTEXT, create_app
from service.settings import Settings
from service.storage.database import Database
from tests.e2e.oauth_helpers import basic, new_app

CC = {"grant_type": "client_credentials"}


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path, log_format="json", violation_window=900)


def coalescer(client) -> CoalescingLedger:
    ledger = client.app[CONTEXT].ledger
    assert isinstance(ledger, CoalescingLedger)
    return ledger


async def events(db, *types: str) -> list[tuple[str, str, dict]]:
    rows = await db.pool.fetch(
        "SELECT type, stream_id, payload FROM events WHERE type = ANY($1) ORDER BY position",
        list(types),
    )
    return [(r["type"], r["stream_id"], json.loads(r["payload"])) for r in rows]


async def test_a_flood_of_token_requests_from_a_disallowed_address_is_one_event_and_a_count(
    client, company, db
):
    app = await new_app(client, company, ip_allowlist=["192.0.2.0/24"])
    creds = basic(app["client_id"], app["client_secret"])
    started = time.time()
    for _ in range(30):
        response = await client.post("/oauth/token", data=CC, headers=creds)
        assert response.status == 403
        assert (await response.json())["error"] == "ip_not_allowed"
    found = await events(db, "IpViolationDetected", "IpViolationsCoalesced")
    assert [t for t, _, _ in found] == ["IpViolationDetected"]
    await coalescer(client).flush(everything=True)  # as when the window closes
    found = await events(db, "IpViolationDetected", "IpViolationsCoalesced")
    assert [t for t, _, _ in found] == ["IpViolationDetected", "IpViolationsCoalesced"]
    (_, first_stream, first), (_, summary_stream, summary) = found
    assert first_stream == summary_stream  # the window's own stream
    assert first["endpoint"] == summary["endpoint"] == "token"
    assert summary["client_id"] == app["client_id"] and summary["ip"] == "127.0.0.1"
    assert summary["count"] == 29 and summary["window_seconds"] == 900
    assert started <= summary["first_at"] <= summary["last_at"] <= time.time()
    assert app["client_secret"] not in json.dumps(found)
    # a dashboard counts every attempt
    rows = await db.pool.fetch(
        "SELECT count, first_at, last_at FROM v_ip_violations WHERE company_id = $1",
        company.company_id,
    )
    assert sum(r["count"] for r in rows) == 30


async def test_uses_of_a_rotated_away_secret_are_one_event_and_a_count(client, company, db):
    app = await new_app(client, company)
    rotate = f"/admin/applications/{app['client_id']}/rotate-secret"
    assert (await client.post(rotate, headers=company.auth)).status == 200
    old = basic(app["client_id"], app["client_secret"])
    for _ in range(25):
        response = await client.post("/oauth/token", data=CC, headers=old)
        assert response.status == 401
    await coalescer(client).flush(everything=True)
    found = await events(db, "OldClientSecretUsed", "OldClientSecretUsesCoalesced")
    assert [t for t, _, _ in found] == ["OldClientSecretUsed", "OldClientSecretUsesCoalesced"]
    assert found[1][2]["count"] == 24 and found[1][2]["secret_version"] == 2


async def test_the_next_attempt_after_the_window_records_its_summary_and_opens_another(
    db, tmp_path
):
    settings = Settings(data_dir=tmp_path, log_format="json", violation_window=2)
    app = create_app(settings, database=Database(db.dsn, db.pool))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        from tests.conftest import make_company

        company = await make_company(client)
        application = await new_app(client, company, ip_allowlist=["192.0.2.0/24"])
        creds = basic(application["client_id"], application["client_secret"])
        await asyncio.sleep(2 - time.time() % 2 + 0.05)  # the start of a window
        for _ in range(4):
            assert (await client.post("/oauth/token", data=CC, headers=creds)).status == 403
        await asyncio.sleep(2 - time.time() % 2 + 0.05)  # the next window
        assert (await client.post("/oauth/token", data=CC, headers=creds)).status == 403
        found = await events(db, "IpViolationDetected", "IpViolationsCoalesced")
    assert [t for t, _, _ in found] == [
        "IpViolationDetected",
        "IpViolationsCoalesced",
        "IpViolationDetected",
    ]
    assert found[1][2]["count"] == 3
    assert found[0][1] == found[1][1] != found[2][1]  # one stream per window


async def test_two_processes_record_one_first_attempt_per_window_between_them(
    client, company, db, settings
):
    other = TestClient(TestServer(create_app(settings, database=Database(db.dsn, db.pool))))
    await other.start_server()
    try:
        app = await new_app(client, company, ip_allowlist=["192.0.2.0/24"])
        creds = basic(app["client_id"], app["client_secret"])
        for i in range(10):
            response = await (client, other)[i % 2].post("/oauth/token", data=CC, headers=creds)
            assert response.status == 403
        for each in (client, other):
            await coalescer(each).flush(everything=True)
    finally:
        await other.close()
    found = await events(db, "IpViolationDetected", "IpViolationsCoalesced")
    types = [t for t, _, _ in found]
    assert types.count("IpViolationDetected") == 1
    assert sum(p["count"] for t, _, p in found if t == "IpViolationsCoalesced") == 9
    assert types.count("IpViolationsCoalesced") == 2  # one per process that counted


async def test_a_gateway_violation_still_revokes_and_records_each_token(client, company, db):
    app = await new_app(client, company, ip_allowlist=["192.0.2.0/24", "127.0.0.1"])
    creds = basic(app["client_id"], app["client_secret"])
    tokens = []
    for _ in range(2):
        response = await client.post("/oauth/token", data=CC, headers=creds)
        tokens.append((await response.json())["access_token"])
    patch = {"ip_allowlist": ["192.0.2.0/24"]}
    path = f"/admin/applications/{app['client_id']}"
    assert (await client.patch(path, json=patch, headers=company.auth)).status == 200
    for token in tokens:
        response = await client.get("/api/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        assert response.status == 403
    found = await events(db, "IpViolationDetected", "IpViolationsCoalesced")
    assert [p["token_revoked"] for _, _, p in found] == [True, True]
