"""Ops endpoints over aiohttp's real stack on a real PostgreSQL: /metrics and /readyz."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import asyncpg
import prometheus_client
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from projections import snapshots
from projections.runner import lock_key
from service import events as ev
from service.app import EVENTLOG, RUNNER, create_app
from service.eventlog import appends
from service.metrics import METRICS, Metrics
from service.notification.notifier import NAME as NOTIFIER
from service.settings import Settings
from service.storage.database import Database
from service.web.middleware import observed
from service.web.ops import READINESS, ReadinessPolicy
from tests.factories import companies, cut_tail

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@asynccontextmanager
async def serving(
    db,
    tmp_path: Path,
    *,
    run_projections: bool = False,
    readiness: ReadinessPolicy | None = None,
    setup: Callable[[web.Application], None] | None = None,
    **settings_fields: Any,
) -> AsyncIterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path, log_format="json", run_projections=run_projections, **settings_fields
    )
    app = create_app(settings, database=Database(db.dsn, db.pool))
    if readiness is not None:
        app[READINESS] = readiness
    if setup is not None:
        setup(app)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def scrape(client: TestClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status == 200
    return parse(await response.text())


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def add_companies(client: TestClient, count: int, start: int = 0) -> None:
    eventlog = client.app[EVENTLOG]
    await asyncio.gather(
        *(
            eventlog.append(
                f"company-ops{n}", 0, [ev.CompanyCreated(company_id=f"ops{n}", name="X")]
            )
            for n in range(start, start + count)
        )
    )


async def catch_up(client: TestClient) -> None:
    runner = client.app[RUNNER]
    for name in runner.projections:
        await runner.catch_up(name)


async def eventually(probe: Callable[[], Awaitable[bool]], seconds: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await probe():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


# --- /metrics ----------------------------------------------------------------------------


async def test_metrics_exposes_every_family_in_prometheus_text(db, tmp_path):
    async with serving(db, tmp_path) as client:
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    assert {
        "tollgate_http_requests",
        "tollgate_http_request_duration_seconds",
        "tollgate_eventlog_append_batch_size",
        "tollgate_projection_lag_events",
        "tollgate_projection_lag_seconds",
        "tollgate_projection_events",
        "tollgate_database_up",
        "tollgate_notification_queue_usage",
        "tollgate_model_snapshot_events_behind",
        "tollgate_tokens_issued",
        "tollgate_token_revocations",
        "tollgate_ip_violations",
        "tollgate_emails_sent",
        "tollgate_emails_failed",
    } <= set(families)
    # the counters that other code moves are there at zero before anything happened
    issued = {
        s.labels["grant_type"]: s.value
        for s in families["tollgate_tokens_issued"].samples
        if s.name.endswith("_total")
    }
    assert issued == {
        "authorization_code": 0,
        "client_credentials": 0,
        "refresh_token": 0,
        "other": 0,
    }
    reasons = {s.labels["reason"] for s in families["tollgate_token_revocations"].samples}
    assert {"ip_violation", "refresh_reuse", "kill_switch", "application_deleted"} <= reasons


async def test_openmetrics_is_served_when_the_scraper_asks_for_it(db, tmp_path):
    async with serving(db, tmp_path) as client:
        response = await client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await response.text()).rstrip().endswith("# EOF")


async def test_request_counter_and_latency_histogram_move_with_traffic(db, tmp_path):
    async def item(_request: web.Request) -> web.Response:
        return web.json_response({})

    def add_item_route(app: web.Application) -> None:
        app.router.add_get("/items/{item_id}", observed(item, "/items/{item_id}"))

    async with serving(db, tmp_path, setup=add_item_route) as client:
        before = await scrape(client)
        for _ in range(3):
            assert (await client.get("/healthz")).status == 200
        for n in range(4):
            assert (await client.get(f"/items/{n}")).status == 200
        assert (await client.get("/no/such/path/1")).status == 404
        assert (await client.get("/no/such/path/2")).status == 404
        assert (await client.post("/healthz")).status == 405
        after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)

    requests = "tollgate_http_requests_total"
    assert moved(requests, route="/healthz", method="GET", status="200") == 3
    # the canonical path, never the raw one: one series for every item
    assert moved(requests, route="/items/{item_id}", method="GET", status="200") == 4
    assert moved(requests, route="unmatched", method="GET", status="404") == 2
    assert moved(requests, route="unmatched", method="POST", status="405") == 1
    routes = {dict(labels).get("route") for (_name, labels) in after}
    assert not any(r and ("/no/such" in r or r.startswith("/items/0")) for r in routes)

    latency = "tollgate_http_request_duration_seconds"
    assert moved(f"{latency}_count", route="/healthz") == 3
    assert moved(f"{latency}_count", route="/items/{item_id}") == 4
    assert moved(f"{latency}_sum", route="/items/{item_id}") > 0
    assert moved(f"{latency}_bucket", route="/healthz", le="+Inf") == 3
    # the first scrape itself was counted by the time of the second
    assert value(after, requests, route="/metrics", method="GET", status="200") == 1


async def test_append_batch_sizes_are_observed_once_each(db, tmp_path):
    async with serving(db, tmp_path) as client:
        eventlog = client.app[EVENTLOG]
        await add_companies(client, 40)  # concurrent: group-committed into few batches
        for n in range(40, 45):
            await add_companies(client, 1, start=n)
        first = await scrape(client)
        second = await scrape(client)
        batches, appends = eventlog.batches_committed, eventlog.appends_committed
    name = "tollgate_eventlog_append_batch_size"
    assert appends >= 45
    assert batches < appends  # group commit happened
    assert value(first, f"{name}_count") == batches
    assert value(first, f"{name}_sum") == appends
    assert value(second, f"{name}_count") == batches  # a second scrape adds nothing
    assert value(first, f"{name}_bucket", le="1.0") >= 5  # the five lone appends


async def test_projection_lag_is_measured_at_scrape_time(db, tmp_path):
    async with serving(db, tmp_path, run_projections=False) as client:
        names = list(client.app[RUNNER].projections)
        await add_companies(client, 12)
        await asyncio.sleep(0.05)
        lagging = await scrape(client)
        await catch_up(client)
        caught_up = await scrape(client)
    assert value(lagging, "tollgate_database_up") == 1
    for name in names:
        assert value(lagging, "tollgate_projection_lag_events", projection=name) == 12
        assert value(lagging, "tollgate_projection_lag_seconds", projection=name) >= 0.05
        assert value(caught_up, "tollgate_projection_lag_events", projection=name) == 0
        assert value(caught_up, "tollgate_projection_lag_seconds", projection=name) == 0


async def test_the_notification_queue_usage_is_read_at_scrape_time(db, tmp_path):
    """A session that listens and stops reading (inside a transaction left open) holds
    every later notification in PostgreSQL's queue: the gauge that the alert
    TollgateNotificationQueueFilling watches rises with the commits."""
    async with serving(db, tmp_path) as client:
        stuck = await asyncpg.connect(db.dsn)
        try:
            await stuck.execute("LISTEN tollgate_batches")
            held = stuck.transaction()
            await held.start()
            await stuck.execute("SELECT 1")
            for n in range(40):
                await add_companies(client, 5, start=5 * n)  # each commit announced
                if await db.pool.fetchval("SELECT pg_notification_queue_usage()") > 0:
                    break
            filling = value(await scrape(client), "tollgate_notification_queue_usage")
            await held.rollback()
        finally:
            await stuck.close()
    assert filling is not None and filling > 0


async def test_how_far_a_start_is_from_its_snapshot_is_read_at_scrape_time(db, tmp_path):
    """What the alert TollgateModelSnapshotBehind watches: the events a start would apply
    after the newest model snapshot, the whole log while there is none."""
    behind, age = "tollgate_model_snapshot_events_behind", "tollgate_model_snapshot_age_seconds"
    async with serving(db, tmp_path) as client:
        await add_companies(client, 4)
        head = await client.app[EVENTLOG].head()
        before = await scrape(client)
        writer = snapshots.SnapshotWriter(
            client.app[EVENTLOG], db.pool, db.dsn, every=3600, min_events=1
        )
        assert await writer.write_once() == head
        written = await scrape(client)
        await add_companies(client, 3, start=4)
        grown = await client.app[EVENTLOG].head() - head
        later = await scrape(client)
    assert (value(before, behind), value(before, age)) == (head, None)
    assert value(written, behind) == 0
    assert 0 <= (value(written, age) or -1) < 60
    assert value(later, behind) == grown == 3


async def test_each_projection_counts_the_positions_it_moved_past(db, tmp_path):
    name = "tollgate_projection_events_total"
    async with serving(db, tmp_path, run_projections=False) as client:
        names = list(client.app[RUNNER].projections)
        await catch_up(client)  # whatever the log already held
        before = await scrape(client)
        await add_companies(client, 12)
        await catch_up(client)
        after = await scrape(client)
    for projection in names:
        moved = value(after, name, projection=projection)
        assert moved is not None
        assert moved - (value(before, name, projection=projection) or 0) == 12
    async with serving(db, tmp_path, run_projections=True) as client:
        first = await scrape(client)
    # A process that runs the projections shows each from the start, at zero if need be.
    assert all(value(first, name, projection=projection) is not None for projection in names)


async def test_counters_for_other_code_move_through_the_metrics_api(db, tmp_path):
    async with serving(db, tmp_path) as client:
        metrics = client.app[METRICS]
        metrics.token_issued("client_credentials")
        metrics.token_issued("client_credentials")
        metrics.token_issued("password")  # not a grant Tollgate knows: no new series
        metrics.token_revoked("refresh_reuse")
        metrics.ip_violation("token")
        metrics.email_sent()
        metrics.email_failed()
        metrics.email_failed()
        samples = await scrape(client)
    assert value(samples, "tollgate_tokens_issued_total", grant_type="client_credentials") == 2
    assert value(samples, "tollgate_tokens_issued_total", grant_type="other") == 1
    assert value(samples, "tollgate_tokens_issued_total", grant_type="password") is None
    assert value(samples, "tollgate_token_revocations_total", reason="refresh_reuse") == 1
    assert value(samples, "tollgate_ip_violations_total", endpoint="token") == 1
    assert value(samples, "tollgate_emails_sent_total") == 1
    assert value(samples, "tollgate_emails_failed_total") == 2


async def test_each_application_has_its_own_registry(tmp_path):
    first = create_app(Settings(data_dir=tmp_path))
    second = create_app(Settings(data_dir=tmp_path))
    assert first[METRICS].registry is not second[METRICS].registry
    first[METRICS].email_sent()
    sent = "tollgate_emails_sent_total"
    assert value(parse(second[METRICS].render()[0].decode()), sent) == 0
    assert value(parse(first[METRICS].render()[0].decode()), sent) == 1
    # nothing lands in prometheus_client's process-wide default registry
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "tollgate_" not in default
    Metrics()  # a third one registers its own collectors without a clash


# --- /readyz -----------------------------------------------------------------------------


async def test_ready_when_the_database_answers_and_projections_are_current(db, tmp_path):
    async with serving(db, tmp_path) as client:
        response = await client.get("/readyz")
        body = await response.json()
        names = set(client.app[RUNNER].projections)
    assert response.status == 200, body
    assert body["status"] == "ready"
    assert {p["name"] for p in body["projections"]} == names
    assert all(p["lag_events"] == 0 for p in body["projections"])


async def test_not_ready_while_projections_lag_then_ready_once_caught_up(db, tmp_path):
    policy = ReadinessPolicy(max_lag_events=5, max_lag_seconds=60)
    async with serving(db, tmp_path, run_projections=False, readiness=policy) as client:
        await add_companies(client, 5)
        assert (await client.get("/readyz")).status == 200  # at the limit is still ready
        await add_companies(client, 1, start=5)
        response = await client.get("/readyz")
        lagging = await response.json()
        assert response.status == 503
        await catch_up(client)
        response = await client.get("/readyz")
        assert response.status == 200
        assert (await response.json())["status"] == "ready"
        names = client.app[RUNNER].projections
    assert lagging["status"] == "not_ready"
    assert sorted(lagging["reasons"]) == sorted(
        f"projection {name} is 6 events behind (at most 5)" for name in names
    )
    assert all(p["lag_events"] == 6 for p in lagging["projections"])


async def test_by_default_readiness_counts_the_age_of_the_lag_not_its_events(db, tmp_path):
    """Under load the events waiting for a projection's next step grow with the log's rate
    (about 900 at 8,000 tokens a second, 0.12 s behind): a bound on their count took every
    host out of rotation at its busiest. A thousand and one fresh events are ready; the
    same events older than READY_MAX_LAG are not; READY_MAX_LAG_EVENTS counts them again."""
    async with serving(db, tmp_path, run_projections=False, ready_max_lag=1.0) as client:
        await add_companies(client, 1001)
        fresh = await client.get("/readyz")
        fresh_body = await fresh.json()
        await asyncio.sleep(1.1)
        stale = await client.get("/readyz")
        stale_body = await stale.json()
    assert fresh.status == 200, fresh_body
    assert all(p["lag_events"] == 1001 for p in fresh_body["projections"])
    assert stale.status == 503
    assert all("s behind (at most 1 s)" in r for r in stale_body["reasons"]), stale_body
    async with serving(db, tmp_path, run_projections=False, ready_max_lag_events=1000) as client:
        counted = await client.get("/readyz")
        body = await counted.json()
    assert counted.status == 503
    assert any("1001 events behind (at most 1000)" in reason for reason in body["reasons"])


async def test_not_ready_when_the_oldest_pending_event_is_too_old(db, tmp_path):
    policy = ReadinessPolicy(max_lag_events=1000, max_lag_seconds=1.0)
    async with serving(db, tmp_path, run_projections=False, readiness=policy) as client:
        await add_companies(client, 1)
        fresh = await client.get("/readyz")
        await asyncio.sleep(1.1)
        stale = await client.get("/readyz")
        body = await stale.json()
    assert fresh.status == 200
    assert stale.status == 503
    assert body["reasons"]
    assert all("s behind (at most 1 s)" in r for r in body["reasons"])


async def test_the_lag_age_is_not_the_probing_hosts_clock(db, tmp_path, monkeypatch):
    """Several hosts probe one log: a host whose clock runs an hour ahead reads the same
    age of the oldest pending event as the others (the database's clock), not an hour."""
    policy = ReadinessPolicy(max_lag_events=None, max_lag_seconds=60)
    async with serving(db, tmp_path, run_projections=False, readiness=policy) as client:
        await add_companies(client, 1)
        ahead = time.time() + 3600
        monkeypatch.setattr(time, "time", lambda: ahead)
        answer = await client.get("/readyz")
        body = await answer.json()
        monkeypatch.undo()
    assert answer.status == 200, body
    assert all(p["lag_events"] == 1 for p in body["projections"])
    assert all(0 <= p["lag_seconds"] < 60 for p in body["projections"])


class _HourBehind(datetime):
    """The writing host's clock, an hour slow."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
        return datetime.now(tz) - timedelta(hours=1)


async def test_the_lag_age_is_not_the_writing_hosts_clock(db, tmp_path, monkeypatch):
    """Several hosts write one log: events written by a host whose clock runs an hour slow
    are recorded an hour back, yet they have waited for the projections only as long as
    they have been in the table (the database's clock): every host stays ready. Rows of a
    log written before the stamp existed fall back to their recorded time."""
    policy = ReadinessPolicy(max_lag_events=None, max_lag_seconds=60)
    async with serving(db, tmp_path, run_projections=False, readiness=policy) as client:
        monkeypatch.setattr(appends, "datetime", _HourBehind)
        await add_companies(client, 3)
        monkeypatch.undo()
        answer = await client.get("/readyz")
        body = await answer.json()
        recorded = await db.pool.fetchval(
            "SELECT extract(epoch FROM now() - max(recorded_at)) FROM events"
        )
        assert recorded > 3500  # the hour is really in the log
        assert answer.status == 200, body
        assert all(p["lag_events"] == 3 for p in body["projections"])
        assert all(0 <= p["lag_seconds"] < 60 for p in body["projections"])
        # A log from before `appended_at`: its rows have none, and their age is the old one.
        await db.pool.execute(
            "ALTER TABLE events DISABLE TRIGGER events_append_only; "
            "UPDATE events SET appended_at = NULL; "
            "ALTER TABLE events ENABLE TRIGGER events_append_only"
        )
        old = await client.get("/readyz")
        old_body = await old.json()
    assert old.status == 503
    assert all(3500 < p["lag_seconds"] < 3700 for p in old_body["projections"]), old_body


async def test_becomes_ready_as_the_running_projections_catch_up(db, tmp_path):
    policy = ReadinessPolicy(max_lag_events=0, max_lag_seconds=60)
    async with serving(db, tmp_path, run_projections=True, readiness=policy) as client:
        await add_companies(client, 30)

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await eventually(ready)
        body = await (await client.get("/readyz")).json()
    assert body["status"] == "ready"
    assert all(p["lag_events"] == 0 for p in body["projections"])


async def test_not_ready_while_the_database_is_unreachable(db, pg_server, tmp_path):
    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        async with serving(db, tmp_path) as client:
            assert (await client.get("/readyz")).status == 200
            await admin.execute(f"ALTER DATABASE {db.name} ALLOW_CONNECTIONS false")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                db.name,
            )
            down = await client.get("/readyz")
            down_body = await down.json()
            metrics = await scrape(client)
            await admin.execute(f"ALTER DATABASE {db.name} ALLOW_CONNECTIONS true")

            async def ready() -> bool:
                return (await client.get("/readyz")).status == 200

            await eventually(ready)
            back = await scrape(client)
    finally:
        await admin.execute(f"ALTER DATABASE {db.name} ALLOW_CONNECTIONS true")
        await admin.close()
    assert down.status == 503
    assert down_body == {
        "status": "not_ready",
        "reasons": ["database unreachable"],
        "projections": [],
    }
    assert value(metrics, "tollgate_database_up") == 0
    assert not any(name == "tollgate_projection_lag_events" for name, _ in metrics)
    assert value(metrics, "tollgate_notification_queue_usage") is None  # not read: absent
    assert value(back, "tollgate_database_up") == 1


async def test_a_notifier_that_does_not_move_shows_in_the_scrape(db, tmp_path):
    """A process that holds the notifier's lock and does nothing (frozen, say) sent no
    email, and before nothing in /metrics said so: no attempt, so no failure counted."""
    holder = await asyncpg.connect(db.dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", lock_key(NOTIFIER))
        async with serving(db, tmp_path) as client:
            eventlog = client.app[EVENTLOG]
            violation = ev.IpViolationDetected(
                company_id="co1", client_id="c1", ip="192.0.2.9", endpoint="token",
                family_id=None, token_revoked=False,
            )  # fmt: skip
            await eventlog.append("violations-c1", None, [violation])
            await asyncio.sleep(1.2)
            samples = await scrape(client)
            assert value(samples, "tollgate_notifier_lag_events") >= 1
            assert value(samples, "tollgate_notifier_lag_seconds") >= 1.0
            await holder.close()  # the lock goes with its session: this process takes over
            deadline = time.monotonic() + 10
            while value(samples, "tollgate_notifier_lag_events") != 0:
                assert time.monotonic() < deadline, "the notifier did not catch up"
                await asyncio.sleep(0.1)
                samples = await scrape(client)
            assert value(samples, "tollgate_notifier_lag_seconds") == 0
    finally:
        await holder.close()


async def test_a_checkpoint_past_the_head_is_not_ready(db, tmp_path):
    """The log's tail deleted (a superuser could): the next appends would reuse positions
    the projections hold as applied, and be skipped. Before, /readyz said ready, with a lag
    of -3."""
    async with serving(db, tmp_path) as client:
        eventlog = client.app[EVENTLOG]
        await companies(eventlog, "c", 3)
        await db.pool.execute(
            "INSERT INTO projection_checkpoints (name, position) VALUES ('companies', 3) "
            "ON CONFLICT (name) DO UPDATE SET position = 3"
        )
        await cut_tail(db.pool, 1)
        response = await client.get("/readyz")
        assert response.status == 503
        body = await response.json()
        assert any(
            "companies is at 3, past the log's head 1: events were removed" in reason
            for reason in body["reasons"]
        ), body


async def test_a_checkpoint_that_saw_another_event_is_not_ready(db, tmp_path):
    """The tail cut and written again past the checkpoint: the events at and below it were
    never applied. Before, /readyz said ready (lag 0 once caught up with positions)."""
    async with serving(db, tmp_path) as client:
        eventlog = client.app[EVENTLOG]
        await companies(eventlog, "c", 3)
        await db.pool.execute(
            "INSERT INTO projection_checkpoints (name) VALUES ('companies') ON CONFLICT DO NOTHING"
        )
        await db.pool.execute(
            "UPDATE projection_checkpoints SET position = 3 WHERE name = 'companies'"
        )
        assert (await client.get("/readyz")).status == 200
        await cut_tail(db.pool, 1)
        await companies(eventlog, "d", 3)
        response = await client.get("/readyz")
        assert response.status == 503
        body = await response.json()
        assert (
            "the event at position 3 is not the one companies applied there: the log was cut "
            "and written again (tollgate audit verify, then tollgate projections rebuild)"
        ) in body["reasons"], body
