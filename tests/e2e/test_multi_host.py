"""Two `tollgate serve` hosts (127.0.0.2 and 127.0.0.3) on one PostgreSQL, as behind a load
balancer: a revocation through one is enforced by the other within a bounded delay, each
violation email goes out once, each SQL projection is run by one process, and the two
hosts' metrics (behind METRICS_TOKEN) add up to what happened."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from projections.catalog import sql_projections
from projections.runner import lock_key
from service.notification.notifier import NAME as NOTIFIER
from tests.e2e.hosts import Host, admin_key, new_application, serving
from tests.e2e.oauth_helpers import basic

REVOCATIONS = 50
METRICS_TOKEN = "scrape-" + "5e1f0c2a9b7d4e36" * 2
VIOLATIONS = 6
BOUND = 5.0  # seconds: a hang, not a performance figure


async def until(probe: Callable[[], Awaitable[bool]], seconds: float = BOUND) -> float:
    started = time.perf_counter()
    while not await probe():
        assert time.perf_counter() - started < seconds, "the other host never caught up"
        await asyncio.sleep(0.002)
    return time.perf_counter() - started


async def test_two_hosts_on_one_database_act_as_one_service(db, tmp_path):
    key = await admin_key(db, tmp_path)
    async with (
        serving(db, tmp_path / "a", host="127.0.0.2", METRICS_TOKEN=METRICS_TOKEN) as a,
        serving(db, tmp_path / "b", host="127.0.0.3", METRICS_TOKEN=METRICS_TOKEN) as b,
        aiohttp.ClientSession() as http,
    ):
        delays = await revocations_through_a_reach_b(http, a, b, key)
        await violations_through_both(http, a, b, key)
        await every_email_recorded(db)
        await projections_at_the_head(db)
        holders = await advisory_lock_holders(db)
        scrapes = [await scrape(http, host) for host in (a, b)]
    print(
        f"\nrevoked through host A, refused by host B after (n={len(delays)}): "
        f"p50 {statistics.median(delays) * 1000:.1f} ms, max {max(delays) * 1000:.1f} ms"
    )
    # each violation mailed once, by whichever host held the notifier's lock
    mailed = [p.name for host in (a, b) for p in (host.data_dir / "mail").glob("*.eml")]
    assert len(mailed) == VIOLATIONS
    assert len(set(mailed)) == VIOLATIONS  # named after the violation's position
    sent = await db.pool.fetchval(
        "SELECT count(*) FROM events WHERE type = 'ViolationNotificationSent'"
    )
    assert sent == VIOLATIONS
    # one process held each projection's lock, and the notifier's (both hosts try)
    names = [p.name for p in sql_projections()]
    assert all(holders.get(lock_key(n)) == 1 for n in [*names, NOTIFIER]), holders
    # no event applied twice nor skipped, although both hosts ran the projections
    stats = dict(await db.pool.fetch("SELECT type, sum(count) FROM event_stats GROUP BY type"))
    logged = dict(await db.pool.fetch("SELECT type, count(*) FROM events GROUP BY type"))
    assert stats == logged
    assert logged["TokenRevoked"] == REVOCATIONS
    # per-host counters that a dashboard sums over `instance`, and each host's process
    issued = sum(s.get(("tollgate_tokens_issued_total", "client_credentials"), 0) for s in scrapes)
    revoked = sum(s.get(("tollgate_token_revocations_total", "client_request"), 0) for s in scrapes)
    assert (issued, revoked) == (REVOCATIONS, REVOCATIONS)
    assert all(s[("process_resident_memory_bytes", "")] > 0 for s in scrapes)


async def scrape(http: aiohttp.ClientSession, host: Host) -> dict[tuple[str, str], float]:
    """(sample, its grant type or reason) -> value, as Prometheus would scrape `host`."""
    async with http.get(f"{host.base}/metrics") as r:
        assert r.status == 401  # METRICS_TOKEN is set: not for anyone who asks
    bearer = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    async with http.get(f"{host.base}/metrics", headers=bearer) as r:
        assert r.status == 200
        text = await r.text()
    return {
        (s.name, s.labels.get("grant_type") or s.labels.get("reason") or ""): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def revocations_through_a_reach_b(
    http: aiohttp.ClientSession, a: Host, b: Host, key: str
) -> list[float]:
    app = await new_application(a.base, key)
    creds = basic(app["client_id"], app["client_secret"])
    delays = []
    for _ in range(REVOCATIONS):
        async with http.post(
            f"{b.base}/oauth/token", data={"grant_type": "client_credentials"}, headers=creds
        ) as r:
            assert r.status == 200, await r.text()
            token = (await r.json())["access_token"]
        bearer = {"Authorization": f"Bearer {token}"}
        async with http.get(f"{b.base}/api/v1/whoami", headers=bearer) as r:
            assert r.status == 200
        async with http.post(f"{a.base}/oauth/revoke", data={"token": token}, headers=creds) as r:
            assert r.status == 200

        async def refused_by_b(bearer: dict[str, str] = bearer) -> bool:
            async with http.get(f"{b.base}/api/v1/whoami", headers=bearer) as r:
                return r.status == 401

        delays.append(await until(refused_by_b))
    return delays


async def violations_through_both(http: aiohttp.ClientSession, a: Host, b: Host, key: str) -> None:
    """One violation per application (no coalescing), alternately through each host."""
    for n in range(VIOLATIONS):
        app = await new_application(a.base, key, name=f"Far {n}", ip_allowlist=["192.0.2.1"])
        host = (a, b)[n % 2]
        async with http.post(
            f"{host.base}/oauth/token",
            data={"grant_type": "client_credentials"},
            headers=basic(app["client_id"], app["client_secret"]),
        ) as r:
            assert r.status in (401, 403), await r.text()


async def every_email_recorded(db) -> None:
    async def recorded() -> bool:
        row = await db.pool.fetchrow(
            "SELECT count(*) FILTER (WHERE type = 'IpViolationDetected') AS seen,"
            " count(*) FILTER (WHERE type = 'ViolationNotificationSent') AS sent FROM events"
        )
        return row["seen"] == VIOLATIONS and row["sent"] == VIOLATIONS

    await until(recorded, 30)
    await asyncio.sleep(1)  # a second sender, were there one, would have written by now


async def projections_at_the_head(db) -> None:
    names = [p.name for p in sql_projections()]

    async def caught_up() -> bool:
        head = await db.pool.fetchval("SELECT coalesce(max(position), 0) FROM events")
        rows = await db.pool.fetch(
            "SELECT position FROM projection_checkpoints WHERE name = ANY($1)", names
        )
        return len(rows) == len(names) and all(r["position"] == head for r in rows)

    await until(caught_up, 30)


async def advisory_lock_holders(db) -> dict[int, int]:
    """Lock key -> how many sessions hold it (a bigint key is classid:objid in pg_locks)."""
    rows = await db.pool.fetch(
        "SELECT (classid::bigint << 32 | objid::bigint) AS key, count(*) AS holders"
        " FROM pg_locks WHERE locktype = 'advisory' AND granted AND database ="
        " (SELECT oid FROM pg_database WHERE datname = current_database()) GROUP BY 1"
    )
    return {_signed(r["key"]): r["holders"] for r in rows}


def _signed(key: int) -> int:
    return key - (1 << 64) if key >= 1 << 63 else key
