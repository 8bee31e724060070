"""The event log's contract: ordering, optimistic concurrency, subscription, tamper evidence.

Marked `eventlog`: CI runs this module once more against a second PostgreSQL major version.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from service import events as ev
from service.audit.verify import verify_log
from service.eventlog import (
    ConcurrencyError,
    EventLog,
    EventLogError,
    EventLogRefused,
    EventLogUnavailable,
    Metadata,
    chain,
)
from service.storage.database import apply_schema, create_pool
from tests.factories import cut_tail, tampered

pytestmark = pytest.mark.eventlog

#: what `events_append` takes to serialise writers (schema.sql)
WRITERS_LOCK = "LOCK TABLE events_writer IN EXCLUSIVE MODE"


def company(n: int) -> ev.CompanyCreated:
    return ev.CompanyCreated(company_id=f"c{n}", name=f"Company {n}")


async def test_appended_events_read_back_in_order_with_metadata(eventlog: EventLog):
    meta = Metadata(actor="user:u1", request_id="r1", client_ip="192.0.2.1", causation=None)
    assert await eventlog.append("s-1", 0, [company(1), company(2)], meta) == [1, 2]
    assert await eventlog.append("s-2", 0, [company(3)]) == [3]

    recorded = await eventlog.read_all()
    assert [(r.position, r.stream_id, r.version) for r in recorded] == [
        (1, "s-1", 1),
        (2, "s-1", 2),
        (3, "s-2", 1),
    ]
    assert recorded[0].metadata == meta
    assert recorded[0].event == company(1)
    assert recorded[0].company_id == "c1"
    assert [r.event for r in await eventlog.read_stream("s-1")] == [company(1), company(2)]
    assert await eventlog.stream_version("s-1") == 2
    assert await eventlog.head() == 3


async def test_same_expected_version_exactly_one_succeeds(eventlog: EventLog, db):
    other = EventLog(db.pool)  # a second writer, as another process would be
    await other.start()
    try:
        results = await asyncio.gather(
            eventlog.append("app-1", 0, [company(1)]),
            other.append("app-1", 0, [company(2)]),
            eventlog.append("app-1", 0, [company(3)]),
            return_exceptions=True,
        )
    finally:
        await other.close()
    successes = [r for r in results if not isinstance(r, BaseException)]
    conflicts = [r for r in results if isinstance(r, ConcurrencyError)]
    assert len(successes) == 1
    assert len(conflicts) == 2
    assert all(c.stream_id == "app-1" and c.expected == 0 and c.actual == 1 for c in conflicts)
    assert len(await eventlog.read_all()) == 1  # the losers wrote nothing


async def test_stale_expected_version_writes_nothing(eventlog: EventLog):
    await eventlog.append("app-1", 0, [company(1)])
    with pytest.raises(ConcurrencyError) as info:
        await eventlog.append("app-1", 0, [company(2), company(3)])
    assert info.value.actual == 1
    assert [r.position for r in await eventlog.read_all()] == [1]
    # `None` means "any version": appends after whatever is there
    assert await eventlog.append("app-1", None, [company(4)]) == [2]


async def test_condition_on_another_stream_refuses_when_it_moved(eventlog: EventLog):
    await eventlog.append("application-a", 0, [company(1)])
    await eventlog.append("application-a", 1, [company(2)])  # e.g. a secret rotation
    with pytest.raises(ConcurrencyError) as info:
        await eventlog.append("token-x", 0, [company(3)], conditions=[("application-a", 1)])
    assert info.value.stream_id == "application-a"
    assert await eventlog.append("token-x", 0, [company(3)], conditions=[("application-a", 2)])
    assert await eventlog.head() == 3


async def test_a_failing_append_does_not_fail_its_batch_neighbours(eventlog: EventLog):
    # PostgreSQL refuses a NUL character in text; that append fails on its own.
    results = await asyncio.gather(
        *(eventlog.append(f"s-{n}", 0, [company(n)]) for n in range(5)),
        eventlog.append("s-\u0000bad", 0, [company(9)]),
        return_exceptions=True,
    )
    assert isinstance(results[-1], EventLogRefused)  # the value, not the database
    assert all(isinstance(r, list) for r in results[:-1])
    assert await eventlog.head() == 5
    assert (await verify_log(eventlog._pool)).ok


async def test_closing_fails_the_appends_it_did_not_write(db):
    log = EventLog(db.pool)
    await log.start()
    assert await log.append("closing-0", 0, [company(0)]) == [1]
    appends = [
        asyncio.ensure_future(log.append(f"closing-{n}", 0, [company(n)])) for n in range(1, 201)
    ]
    await asyncio.sleep(0)  # queued, and the writer not yet woken
    await log.close()
    results = await asyncio.wait_for(asyncio.gather(*appends, return_exceptions=True), 5)
    written = [r for r in results if isinstance(r, list)]
    refused = [r for r in results if isinstance(r, EventLogUnavailable)]
    assert len(written) + len(refused) == 200  # none hangs, none fails another way
    assert refused
    async with db.pool.acquire() as conn:
        stored = await conn.fetchval("SELECT count(*) FROM events WHERE stream_id LIKE 'closing-%'")
    # An append cancelled in flight may have committed (like a lost connection), so the
    # log holds at least what was reported written.
    assert stored >= 1 + len(written)


async def test_concurrent_writers_never_let_a_subscriber_skip_an_event(db):
    """8 writers on their own connections append thousands of events while a live
    subscriber reads; it must see every position exactly once, in order, with no gap."""
    writers = 8
    per_writer = 400
    rounds = 3
    pools = [await create_pool(db.dsn, min_size=1, max_size=2) for _ in range(writers)]
    logs = [EventLog(pool) for pool in pools]
    subscriber_log = EventLog(db.pool, db.dsn, poll_interval=0.5)
    for log in [*logs, subscriber_log]:
        await log.start()
    try:
        expected_total = 0
        for round_no in range(rounds):
            seen: list[int] = []
            expected_total += writers * per_writer

            async def subscribe(target: int, seen: list[int] = seen) -> None:
                async for batch in subscriber_log.subscribe(after=0, batch_size=137):
                    seen.extend(r.position for r in batch)
                    if len(seen) >= target:
                        return

            async def write(log: EventLog, w: int, round_no: int = round_no) -> None:
                # Many appends in flight per writer, so each commits in groups.
                await asyncio.gather(
                    *(
                        log.append(f"r{round_no}-w{w}-s{n}", 0, [company(n)])
                        for n in range(per_writer)
                    )
                )

            reader = asyncio.create_task(subscribe(expected_total))
            await asyncio.gather(*(write(log, w) for w, log in enumerate(logs)))
            await asyncio.wait_for(reader, timeout=60)
            assert seen == list(range(1, expected_total + 1))
        assert sum(log.batches_committed for log in logs) < rounds * writers * per_writer
    finally:
        for log in [*logs, subscriber_log]:
            await log.close()
        for pool in pools:
            await pool.close()
    assert (await verify_log(db.pool)).ok


@pytest.mark.parametrize(
    "maintenance",
    [
        "ANALYZE events",
        # what VACUUM and CREATE INDEX CONCURRENTLY take (neither runs in a transaction)
        "LOCK TABLE events IN SHARE UPDATE EXCLUSIVE MODE",
    ],
)
async def test_appends_go_on_while_the_log_is_vacuumed_or_analysed(
    eventlog: EventLog, db, maintenance: str
):
    """Autovacuum's VACUUM and ANALYZE of the log hold SHARE UPDATE EXCLUSIVE for as long
    as they run; the writers' lock must not wait for it (EXCLUSIVE mode did: every append
    waited out each autovacuum of the log)."""
    await eventlog.append("m-0", 0, [company(0)])
    maintainer = await asyncpg.connect(db.dsn)
    try:
        async with maintainer.transaction():
            await maintainer.execute(maintenance)  # held until the transaction ends
            written = await asyncio.wait_for(
                asyncio.gather(*(eventlog.append(f"m-{n}", 0, [company(n)]) for n in (1, 2))), 5
            )
    finally:
        await maintainer.close()
    assert sorted(written) == [[2], [3]]
    assert (await verify_log(db.pool)).ok


async def test_an_append_waits_while_another_writer_holds_the_writers_lock(eventlog: EventLog, db):
    """Writers are serialised on `events_writer` until the holder's commit: positions follow
    commit order only if every writer takes that lock."""
    await eventlog.append("w-0", 0, [company(0)])
    holder = await asyncpg.connect(db.dsn)
    try:
        async with holder.transaction():
            await holder.execute(WRITERS_LOCK)
            waiting = asyncio.create_task(eventlog.append("w-1", 0, [company(1)]))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            waiters = await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation ="
                " 'events_writer'::regclass AND database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            assert waiters == 1  # the writer's backend waits for that very lock
    finally:
        await holder.close()
    assert await asyncio.wait_for(waiting, 5) == [2]


async def test_a_session_that_may_only_read_the_log_cannot_take_the_writers_lock(db):
    """Taking the lock needs the right to update `events_writer`: a role that reads the log
    (an auditor, a dashboard) cannot hold the writers up (an advisory lock, anyone could)."""
    role = f"reader_{db.name}"
    await db.pool.execute(f"CREATE ROLE {role} LOGIN")
    try:
        await db.pool.execute(f"GRANT SELECT ON events, events_writer TO {role}")
        reader = await asyncpg.connect(db.dsn, user=role)
        try:
            async with reader.transaction():
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await reader.execute(WRITERS_LOCK)
            assert len(await reader.fetch("SELECT position FROM events")) == 0
        finally:
            await reader.close()
    finally:
        await db.pool.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


async def test_subscriber_wakes_by_polling_without_notifications(db):
    writer = EventLog(db.pool)
    reader = EventLog(db.pool, None, poll_interval=0.05)  # no LISTEN connection at all
    await writer.start()
    await reader.start()
    try:
        got: list[int] = []

        async def consume() -> None:
            async for batch in reader.subscribe():
                got.extend(r.position for r in batch)
                if len(got) == 3:
                    return

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        for n in range(3):
            await writer.append(f"s-{n}", 0, [company(n)])
        await asyncio.wait_for(task, 5)
        assert got == [1, 2, 3]
    finally:
        await writer.close()
        await reader.close()


async def test_notification_wakes_a_subscriber_in_another_process(db, eventlog: EventLog):
    writer = EventLog(await create_pool(db.dsn, min_size=1, max_size=1))
    await writer.start()
    eventlog.poll_interval = 30  # only a notification can wake it in time
    try:
        await asyncio.sleep(0.3)  # the LISTEN connection is up
        batches = eventlog.subscribe()
        first = asyncio.create_task(anext(batches))
        await asyncio.sleep(0.1)
        await writer.append("s-1", 0, [company(1)])
        batch = await asyncio.wait_for(first, 5)
        assert [r.position for r in batch] == [1]
    finally:
        await writer.close()
        await writer._pool.close()


async def test_the_log_refuses_update_and_delete(eventlog: EventLog, db):
    await eventlog.append("s-1", 0, [company(1)])
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await db.pool.execute("UPDATE events SET type = 'X'")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await db.pool.execute("DELETE FROM events")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await db.pool.execute("TRUNCATE events")


async def test_schema_applies_twice_harmlessly(eventlog: EventLog, db):
    await eventlog.append("s-1", 0, [company(1)])
    async with db.pool.acquire() as conn:
        await apply_schema(conn)
        await apply_schema(conn)
    assert await db.pool.fetchval("SELECT array_agg(version) FROM schema_version") == [1]
    assert await eventlog.head() == 1
    assert await eventlog.append("s-1", 1, [company(2)]) == [2]


# --- tamper evidence -------------------------------------------------------------------


async def _ten_events(eventlog: EventLog) -> None:
    for n in range(1, 11):
        await eventlog.append(f"s-{n}", 0, [company(n)], Metadata(actor=f"user:{n}"))


async def test_verify_accepts_an_untouched_log(eventlog: EventLog, db):
    await _ten_events(eventlog)
    result = await verify_log(db.pool, batch=3)
    assert result.ok
    assert result.checked == 10
    assert result.head_hash == (await eventlog.read_all(9, 1))[0].hash


async def test_verify_names_a_changed_payload(eventlog: EventLog, db):
    await _ten_events(eventlog)
    await tampered(
        db.pool,
        """UPDATE events SET payload = jsonb_set(payload::jsonb, '{name}', '"Evil"')::json
                         WHERE position = 4""",
    )
    result = await verify_log(db.pool, batch=3)
    assert not result.ok
    assert result.broken.position == 4
    assert result.checked == 3


async def test_verify_names_changed_metadata(eventlog: EventLog, db):
    await _ten_events(eventlog)
    await tampered(
        db.pool,
        """UPDATE events SET metadata = jsonb_set(metadata::jsonb, '{actor}', '"user:x"')::json
                         WHERE position = 7""",
    )
    assert (await verify_log(db.pool)).broken.position == 7


async def test_verify_names_a_deleted_event(eventlog: EventLog, db):
    await _ten_events(eventlog)
    await tampered(db.pool, "DELETE FROM events WHERE position = 6")
    result = await verify_log(db.pool)
    assert result.broken.position == 6
    assert "missing" in result.broken.reason


async def test_verify_names_swapped_events(eventlog: EventLog, db):
    await _ten_events(eventlog)
    await tampered(
        db.pool,
        """UPDATE events SET position = 1000 WHERE position = 3;
           UPDATE events SET position = 3 WHERE position = 8;
           UPDATE events SET position = 8 WHERE position = 1000;""",
    )
    result = await verify_log(db.pool)
    assert result.broken.position == 3


async def _chained_whole(db, count: int) -> None:
    """`count` events as versions before the digests chained them: each link over all the
    event holds (chain.event_hash_whole), as such a log holds them."""
    previous = chain.GENESIS
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    async with db.pool.acquire() as conn:
        for position in range(1, count + 1):
            event = company(100 + position)
            payload, metadata = ev.encode(event).decode(), f'{{"actor":"user:{position}"}}'
            content = chain.Content(
                f"old-{position}", "CompanyCreated", 1, event.company_id, payload.encode(),
                metadata.encode(), chain.timestamp(moment),
            )  # fmt: skip
            previous = chain.event_hash_whole(previous, position, 1, content)
            await conn.execute(
                "INSERT INTO events VALUES ($1, $2, 1, 'CompanyCreated', 1, $3, $4, $5, $6, $7)",
                position, f"old-{position}", event.company_id, payload, metadata, moment,
                previous,
            )  # fmt: skip


async def test_a_log_chained_over_whole_events_verifies_on_after_the_digests(
    eventlog: EventLog, db
):
    """A log whose first links were written over all each event held, as before the
    writers sent digests, goes on with links over the digests: `verify` accepts both forms
    of link, and names a change on either side of where one form gives way to the other."""
    await _chained_whole(db, 5)
    await _ten_events(eventlog)  # positions 6 to 15, chained on the last whole link
    result = await verify_log(db.pool, batch=4)
    assert result.ok and result.checked == 15
    assert result.head_hash == (await eventlog.read_all(14, 1))[0].hash
    for position, change in [
        (3, """payload = jsonb_set(payload::jsonb, '{name}', '"Evil"')::json"""),
        (5, "recorded_at = recorded_at + interval '1 microsecond'"),
        (6, """metadata = jsonb_set(metadata::jsonb, '{actor}', '"user:x"')::json"""),
    ]:
        async with db.pool.acquire() as conn:
            changed = conn.transaction()
            await changed.start()
            try:
                await conn.execute("SET LOCAL session_replication_role = replica")
                await conn.execute(f"UPDATE events SET {change} WHERE position = {position}")
                rows = await conn.fetch("SELECT * FROM events ORDER BY position")
                result = await chain.verify(_iterated(rows))
            finally:
                await changed.rollback()  # undone for the next change
        assert result.broken is not None, change
        assert (result.broken.position, result.checked) == (position, position - 1), change
    assert (await verify_log(db.pool)).ok


async def _iterated(rows: list[asyncpg.Record]) -> AsyncIterator[asyncpg.Record]:
    for row in rows:
        yield row


async def test_verify_names_a_deleted_last_event_by_head_hash_change(eventlog: EventLog, db):
    await _ten_events(eventlog)
    before = await verify_log(db.pool)
    await tampered(db.pool, "DELETE FROM events WHERE position = 10")
    after = await verify_log(db.pool)
    # Truncating the tail leaves a valid shorter chain: the recorded head hash shows it.
    assert after.ok
    assert after.head == 9
    assert after.head_hash != before.head_hash


async def test_the_writer_reconnects_after_its_connection_is_killed(eventlog: EventLog, db):
    assert await eventlog.append("before", 0, [company(1)]) == [1]
    writer_pid = eventlog._conn.get_server_pid()
    await db.pool.execute("SELECT pg_terminate_backend($1)", writer_pid)
    outcomes = []
    for n in range(5):  # the first may fail while the loss is noticed; then it must write
        try:
            outcomes.append(await eventlog.append(f"after-{n}", 0, [company(2)]))
        except EventLogUnavailable:
            outcomes.append(None)
    assert all(outcomes[1:]), outcomes  # before the fix: every one of them failed, for ever
    assert eventlog._conn.get_server_pid() != writer_pid
    assert (await verify_log(db.pool)).ok


class _ReplyLost:
    """The writer's connection, except that the next statement's reply is lost after the
    server has run (and committed) it: the client cannot know whether it committed."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self.armed = True

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def _lose(self) -> None:
        if self.armed:
            self.armed = False
            raise ConnectionResetError("the reply was lost")

    async def fetchval(self, *args, **kwargs):  # events_append: one statement per batch
        result = await self._conn.fetchval(*args, **kwargs)
        self._lose()
        return result

    def transaction(self):  # an explicit transaction: the reply to COMMIT is lost
        outer = self

        class Committing:
            async def __aenter__(self):
                self._tx = outer._conn.transaction()
                return await self._tx.__aenter__()

            async def __aexit__(self, *exc):
                done = await self._tx.__aexit__(*exc)
                if exc[0] is None:
                    outer._lose()
                return done

        return Committing()


def lose_the_next_reply(monkeypatch) -> list[_ReplyLost]:
    """The writer's connection, from now on, loses the reply to its next statement (see
    _ReplyLost); the list holds that connection once the writer has taken it."""
    real = EventLog._writer_connection
    lost: list[_ReplyLost] = []

    async def once(self):
        conn = await real(self)
        if not lost:
            lost.append(_ReplyLost(conn))
            return lost[0]
        return conn

    monkeypatch.setattr(EventLog, "_writer_connection", once)
    return lost


@pytest.mark.parametrize("any_version", [False, True])
async def test_a_batch_whose_commit_reply_is_lost_is_neither_repeated_nor_refused(
    eventlog: EventLog, db, monkeypatch, any_version
):
    assert await eventlog.append("first", 0, [company(0)]) == [1]  # the head is known
    lost = lose_the_next_reply(monkeypatch)
    # Any version: retried, it would be written twice. Version 0: retried, it would find
    # itself there and fail as a conflict.
    expected = None if any_version else 0
    results = await asyncio.gather(
        eventlog.append("any-1", expected, [company(1)]),
        eventlog.append("new-2", 0, [company(2)]),
        eventlog.append("any-3", expected, [company(3)]),
        return_exceptions=True,
    )
    assert not lost[0].armed  # the reply was indeed lost
    assert results == [[2], [3], [4]]  # committed once, and reported as committed
    async with db.pool.acquire() as conn:
        rows = await conn.fetch("SELECT stream_id, version FROM events ORDER BY position")
    assert [(r["stream_id"], r["version"]) for r in rows] == [
        ("first", 1), ("any-1", 1), ("new-2", 1), ("any-3", 1)
    ]  # fmt: skip
    assert await eventlog.append("later", 0, [company(4)]) == [5]
    assert (await verify_log(db.pool)).ok


async def test_an_append_that_cannot_be_encoded_fails_alone_and_the_writer_lives(
    eventlog: EventLog,
):
    results = await asyncio.gather(
        eventlog.append("good", 0, [company(1)]),
        eventlog.append("bad", 0, [ev.CompanyCreated(company_id="c2", name="\ud800")]),
        return_exceptions=True,
    )
    assert results[0] == [1]
    assert isinstance(results[1], EventLogError)
    assert await asyncio.wait_for(eventlog.append("after", 0, [company(3)]), 5) == [2]


async def test_the_verify_command_prints_the_anchor_or_where_the_chain_breaks(
    eventlog: EventLog, db
):
    import json

    from tests.integration.test_replay import tollgate

    await _ten_events(eventlog)
    code, out, _err = await tollgate(db, "audit", "verify")
    intact = json.loads(out)
    assert code == 0
    assert intact["ok"] is True and intact["head"] == 10
    assert intact["head_hash"] == (await eventlog.read_all(9, 1))[0].hash.hex()
    await tampered(
        db.pool,
        """UPDATE events SET payload = jsonb_set(payload::jsonb, '{name}', '"Evil"')::json
                         WHERE position = 4""",
    )
    code, out, _err = await tollgate(db, "audit", "verify")
    broken = json.loads(out)
    assert code == 1
    assert broken["ok"] is False
    assert broken["broken_at"] == 4
    assert broken["intact_through"] == 3  # not "head": the head of the log is 10
    assert broken["intact_hash"] == (await eventlog.read_all(2, 1))[0].hash.hex()
    assert "head_hash" not in broken  # not an anchor to record


async def test_a_schema_already_applied_takes_no_lock(eventlog: EventLog, db):
    """A second process starting (or a command such as `tollgate events`) while a writer
    holds the log's lock: the same schema text is not applied again, so it neither waits
    for the writer nor holds the next one back."""
    await eventlog.append("s-1", 0, [company(1)])
    writer = await asyncpg.connect(db.dsn)
    try:
        async with writer.transaction():
            # as an append does
            await writer.execute("LOCK TABLE events IN ROW EXCLUSIVE MODE")
            await writer.execute(WRITERS_LOCK)
            async with db.pool.acquire() as conn:
                await asyncio.wait_for(apply_schema(conn), 5)
    finally:
        await writer.close()
    assert await db.pool.fetchval("SELECT count(*) FROM schema_applied") == 1


async def test_a_changed_schema_text_is_applied(db, monkeypatch):
    from service.storage import database

    text = database.schema_sql()
    monkeypatch.setattr(database, "schema_sql", lambda: text + "\n-- a later version\n")
    async with db.pool.acquire() as conn:
        await apply_schema(conn)
    assert await db.pool.fetchval("SELECT count(*) FROM schema_applied") == 2


async def test_a_log_from_before_appended_at_gets_it_for_new_rows_only(
    eventlog: EventLog, db, monkeypatch
):
    """A log written before rows carried `appended_at`: applying the schema adds the column
    without rewriting a row (theirs stay NULL, their age read from `recorded_at`) and every
    row appended after it is stamped by the database."""
    from service.storage import database

    await db.pool.execute("ALTER TABLE events DROP COLUMN appended_at")
    await eventlog.append("s-old", 0, [company(1)])
    text = database.schema_sql()
    monkeypatch.setattr(database, "schema_sql", lambda: text + "\n-- a later version\n")
    async with db.pool.acquire() as conn:
        await apply_schema(conn)
    await eventlog.append("s-new", 0, [company(2)])
    rows = await db.pool.fetch(
        "SELECT stream_id, appended_at, clock_timestamp() - appended_at AS age "
        "FROM events ORDER BY position"
    )
    assert [(r["stream_id"], r["appended_at"] is None) for r in rows] == [
        ("s-old", True),
        ("s-new", False),
    ]
    assert timedelta(0) <= rows[1]["age"] < timedelta(seconds=30)


async def test_a_changed_schema_waits_for_no_reader_or_writer_of_the_log(
    eventlog: EventLog, db, monkeypatch
):
    """A new version's schema applied while a long query reads the log (a report, an
    auditor's walk) and an append of the previous version's processes is in flight: once
    the log has its columns, index and triggers, nothing in it locks `events` against
    either (it would wait for them, and hold every append and read back meanwhile)."""
    from service.storage import database

    await eventlog.append("s-1", 0, [company(1)])
    reader = await asyncpg.connect(db.dsn)
    writer = await asyncpg.connect(db.dsn)
    try:
        async with reader.transaction(), writer.transaction():
            await reader.fetchval("SELECT count(*) FROM events")  # ACCESS SHARE, held
            await writer.execute("LOCK TABLE events IN ROW EXCLUSIVE MODE")  # as an append
            await writer.execute(WRITERS_LOCK)
            text = database.schema_sql()
            monkeypatch.setattr(database, "schema_sql", lambda: text + "\n-- a later version\n")
            async with db.pool.acquire() as conn:
                await asyncio.wait_for(apply_schema(conn), 10)
    finally:
        await reader.close()
        await writer.close()
    assert await db.pool.fetchval("SELECT count(*) FROM schema_applied") == 2


async def test_a_changed_schema_enables_the_append_only_triggers_again(db, monkeypatch):
    """Triggers a superuser disabled on the log are enabled again by the next version's
    schema, as dropping and creating them did: the log is append-only again."""
    from service.storage import database

    await db.pool.execute(
        "ALTER TABLE events DISABLE TRIGGER events_append_only; "
        "ALTER TABLE events DISABLE TRIGGER events_no_truncate"
    )
    text = database.schema_sql()
    monkeypatch.setattr(database, "schema_sql", lambda: text + "\n-- a later version\n")
    async with db.pool.acquire() as conn:
        await apply_schema(conn)
    states = await db.pool.fetch(
        "SELECT tgname, tgenabled::text AS tgenabled FROM pg_trigger WHERE tgrelid = 'events'::regclass "
        "AND NOT tgisinternal ORDER BY tgname"
    )
    assert [(r["tgname"], r["tgenabled"]) for r in states] == [
        ("events_append_only", "O"),
        ("events_no_truncate", "O"),
    ]


@pytest.mark.parametrize("evidence", ["checkpoint", "snapshot"])
async def test_verify_names_a_tail_the_database_remembers_and_the_log_lost(
    eventlog: EventLog, db, evidence
):
    """Before, `audit verify` said ok for a truncated tail: the chain it walks ends
    intact. A projection's checkpoint, or a model snapshot, at a position the log no
    longer reaches says what the chain cannot."""
    for n in range(10):
        await eventlog.append(f"tail-{n}", 0, [company(n)])
    if evidence == "checkpoint":
        await db.pool.execute(
            "INSERT INTO projection_checkpoints (name, position) VALUES ('tokens', 10) "
            "ON CONFLICT (name) DO UPDATE SET position = 10"
        )
    else:
        await db.pool.execute(
            "INSERT INTO model_snapshots (format, position, part, parts, event_hash, data) "
            "SELECT 'f', 10, 0, 1, hash, '\\x00' FROM events WHERE position = 10"
        )
    assert (await verify_log(db.pool)).ok  # the whole log, and what remembers it
    await cut_tail(db.pool, 8)
    result = await verify_log(db.pool)
    assert not result.ok
    assert result.broken is not None and result.broken.position == 9
    assert "events after 8 were removed" in result.broken.reason
    assert result.checked == 8


async def _checkpoint_at(db, name: str, position: int) -> None:
    """A checkpoint moved to `position` as a projection moves it (it records what it saw)."""
    await db.pool.execute(
        "INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING", name
    )
    await db.pool.execute(
        "UPDATE projection_checkpoints SET position = $2 WHERE name = $1", name, position
    )


@pytest.mark.parametrize("evidence", ["checkpoint", "snapshot"])
async def test_verify_names_a_tail_cut_and_written_again_past_what_remembers_it(
    eventlog: EventLog, db, evidence
):
    """Once the log has grown past a cut tail again, no checkpoint lies beyond the head,
    and verify said ok. The event a checkpoint or a snapshot saw at its position is
    another now; one below it that still sees its own bounds where the rewrite began."""
    for n in range(10):
        await eventlog.append(f"tail-{n}", 0, [company(n)])
    await _checkpoint_at(db, "companies", 4)
    if evidence == "checkpoint":
        await _checkpoint_at(db, "tokens", 8)
        what = "the 'tokens' checkpoint"
    else:
        await db.pool.execute(
            "INSERT INTO model_snapshots (format, position, part, parts, event_hash, data) "
            "SELECT 'f', 8, 0, 1, hash, '\\x00' FROM events WHERE position = 8"
        )
        what = "a model snapshot"
    hash_at_4 = await db.pool.fetchval("SELECT hash FROM events WHERE position = 4")
    assert (await verify_log(db.pool)).ok
    await cut_tail(db.pool, 6)
    for n in range(5):
        await eventlog.append(f"again-{n}", 0, [company(20 + n)])
    result = await verify_log(db.pool)
    assert not result.ok and result.checked == 11
    assert result.broken is not None and result.broken.position == 5
    assert result.broken.reason == (
        f"the event at 8 is not the one {what} saw there: the log was cut after 4 and at or "
        "before 8, and written again"
    )
    assert result.head_hash == hash_at_4  # how far it holds, as the CLI prints it


async def test_a_checkpoint_refuses_to_move_on_from_an_event_it_did_not_see(eventlog: EventLog, db):
    for n in range(6):
        await eventlog.append(f"seen-{n}", 0, [company(n)])
    await _checkpoint_at(db, "tokens", 5)
    await _checkpoint_at(db, "tokens", 6)  # an intact log: it moves
    await cut_tail(db.pool, 3)
    for n in range(4):
        await eventlog.append(f"again-{n}", 0, [company(20 + n)])
    with pytest.raises(asyncpg.DataCorruptedError, match="rewritten at or before position 6"):
        await _checkpoint_at(db, "tokens", 7)
    async with db.pool.acquire() as conn, conn.transaction():  # a rebuild's switch
        await conn.execute("SET LOCAL tollgate.rebuild = 'on'")
        await conn.execute("UPDATE projection_checkpoints SET position = 7 WHERE name = 'tokens'")
    await _checkpoint_at(db, "tokens", 7)  # from what it saw, it moves again


async def test_verify_is_not_alarmed_by_what_lies_below_the_head(eventlog: EventLog, db):
    for n in range(3):
        await eventlog.append(f"low-{n}", 0, [company(n)])
    await db.pool.execute(
        "INSERT INTO projection_checkpoints (name, position) VALUES ('tokens', 3) "
        "ON CONFLICT (name) DO UPDATE SET position = 3"
    )
    assert (await verify_log(db.pool)).ok


async def test_a_changed_schema_behind_a_long_report_holds_no_running_host_back(db, monkeypatch):
    """A report reads a view the new text replaces (its ACCESS SHARE lock held for as long
    as it runs): the text waits for it, and waited holding the locks it had taken before
    (a column added to web_sessions): every running host's sign-in and session checks
    stalled behind it. Now it lets them go each time a lock is not had within a second,
    and tries again: they wait a second at most, and the text is applied once the report
    is done."""
    from service.storage import database

    report = await asyncpg.connect(db.dsn)
    text = database.schema_sql()
    monkeypatch.setattr(database, "schema_sql", lambda: text + "\n-- a later version\n")
    try:
        await report.execute("BEGIN")
        await report.fetchval("SELECT count(*) FROM v_ip_violations")  # held
        async with db.pool.acquire() as conn:
            applying = asyncio.ensure_future(apply_schema(conn, lock_wait=0.2))
            await asyncio.sleep(1.0)  # it has tried, and waits behind the report
            for _ in range(5):  # a running host's reads of the tables it alters
                await asyncio.wait_for(db.pool.fetchval("SELECT count(*) FROM web_sessions"), 2)
                await asyncio.sleep(0.1)
            assert not applying.done()
            await report.execute("COMMIT")
            await asyncio.wait_for(applying, 10)
    finally:
        await report.close()
    assert await db.pool.fetchval("SELECT count(*) FROM schema_applied") == 2


async def test_a_changed_schema_picked_by_a_deadlock_check_tries_again(db, monkeypatch):
    """Its locks crossed a running session's, and the deadlock check (a deadlock_timeout
    shorter than its lock wait) picked it: it rolls back and tries again, as for a lock not
    had in time. Before, the start failed. Here the text holds `applications` (altered
    early) and waits for `dpop_nonces` (a third session's), while a running session holds
    `model_snapshots` (altered late) and waits for `applications`."""
    from service.storage import database

    text = database.schema_sql()
    monkeypatch.setattr(database, "schema_sql", lambda: text + "\n-- a later version\n")
    running = await asyncpg.connect(db.dsn)
    third = await asyncpg.connect(db.dsn)
    try:
        await running.execute("SET deadlock_timeout = '10s'")  # the text's check comes first
        await running.execute("BEGIN; LOCK TABLE model_snapshots IN ROW EXCLUSIVE MODE")
        await third.execute("BEGIN; LOCK TABLE dpop_nonces IN ROW EXCLUSIVE MODE")
        async with db.pool.acquire() as conn:
            await conn.execute("SET deadlock_timeout = '100ms'")
            applying = asyncio.ensure_future(apply_schema(conn, lock_wait=5.0))
            await asyncio.sleep(0.5)  # the text holds applications, waits for dpop_nonces
            reading = asyncio.ensure_future(running.fetchval("SELECT count(*) FROM applications"))
            await asyncio.sleep(0.3)
            await third.execute("COMMIT")  # the text goes on, to wait for model_snapshots
            await asyncio.wait_for(reading, 10)  # the text was picked, and gave way
            await running.execute("COMMIT")
            await asyncio.wait_for(applying, 20)
            await conn.execute("RESET deadlock_timeout")
    finally:
        await running.close()
        await third.close()
    assert await db.pool.fetchval("SELECT count(*) FROM schema_applied") == 2
