"""The feed that keeps in-memory models current: what it forgets as time passes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import pytest

from projections import feed as feed_module
from projections.feed import MemoryFeed
from projections.memory import PolicyModel
from service import events as ev
from service.eventlog import SENDER_TRUST, EventLog, EventLogUnavailable
from service.events import SCHEMA_VERSIONS


def code(n: int, expires_at: int) -> ev.AuthorizationCodeIssued:
    return ev.AuthorizationCodeIssued(
        company_id="c1",
        client_id="app-1",
        user_id="u1",
        code_hash=f"{n:064x}",
        redirect_uri="https://app.example/cb",
        permissions=["invoices:read"],
        code_challenge=None,
        expires_at=expires_at,
    )


async def test_the_feed_forgets_codes_past_their_reuse_window(eventlog: EventLog, monkeypatch):
    now = int(time.time())
    await eventlog.append("code-old", 0, [code(1, now - 2 * 3600)])  # expired 2 h ago
    await eventlog.append("code-new", 0, [code(2, now + 600)])
    monkeypatch.setattr(feed_module, "COMPACT_EVERY", 0.0)
    model = PolicyModel()
    feed = MemoryFeed(eventlog, [model])
    await feed.start()
    try:
        for _ in range(100):
            if f"{1:064x}" not in model.codes:
                break
            await asyncio.sleep(0.05)
    finally:
        await feed.close()
    assert f"{1:064x}" not in model.codes  # a process that runs for months stays small
    assert f"{2:064x}" in model.codes


async def write_unknown_event(
    db, eventlog: EventLog, type_name: str = "FromTheFuture", schema_version: int = 1
) -> int:
    """An event this version cannot read, as a newer version would write it: of a type it
    does not know, or of a known type in a newer shape."""
    position = await eventlog.head() + 1
    async with db.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO events (position, stream_id, version, type, schema_version,"
            " company_id, payload, metadata, recorded_at, hash)"
            " VALUES ($1, 'future-1', 1, $3, $4, 'c1', '{\"x\": 1}', '{}', now(),"
            " sha256($2::bytea))",
            position,
            str(position).encode(),
            type_name,
            schema_version,
        )
    return position


async def test_the_feed_skips_an_event_it_cannot_read_and_goes_on(eventlog: EventLog, db):
    await eventlog.append("code-a", 0, [code(1, int(time.time()) + 600)])
    unknown = await write_unknown_event(db, eventlog)
    [after] = await eventlog.append("code-b", 0, [code(2, int(time.time()) + 600)])
    assert after > unknown
    model = PolicyModel()
    feed = MemoryFeed(eventlog, [model])
    await feed.catch_up()
    assert model.position == after  # not stuck before the unknown event
    assert f"{2:064x}" in model.codes  # and what follows it applied


@pytest.mark.parametrize(
    ("event_type", "reader"),
    [("AccessTokenIssued", "tokens"), ("ApplicationCreated", "applications")],
    ids=["lean-read", "full-read"],
)
async def test_a_projection_stops_before_an_event_it_cannot_read_and_says_so(
    eventlog: EventLog, db, event_type, reader
):
    import structlog

    from projections.catalog import sql_projections
    from projections.runner import ProjectionRunner

    await eventlog.append("code-a", 0, [code(1, int(time.time()) + 600)])
    unknown = await write_unknown_event(db, eventlog, event_type, schema_version=99)
    await eventlog.append("code-b", 0, [code(2, int(time.time()) + 600)])
    runner = ProjectionRunner(eventlog, db.pool, db.dsn, sql_projections())
    runner.standby_interval = 0.05
    await runner.ensure_checkpoints()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(runner.run_forever())
        try:
            for _ in range(100):
                if any(e["event"] == "projection.failed" for e in logs):
                    break
                await asyncio.sleep(0.05)
            assert not task.done()  # the runner lives on; it did not die with the error
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert any(e["event"] == "projection.failed" for e in logs)
    checkpoints = dict(await db.pool.fetch("SELECT name, position FROM projection_checkpoints"))
    # The projection that reads this type stops before the event, so nothing is skipped;
    # the others read other types and go on to the head, event_stats counting the event
    # by its type as the database sees it.
    head = await eventlog.head()
    assert checkpoints.pop(reader) < unknown
    assert checkpoints == dict.fromkeys(checkpoints, head)
    counted = await db.pool.fetchval(
        "SELECT sum(count) FROM event_stats WHERE type = $1", event_type
    )
    assert counted == 1


async def test_waiting_for_a_position_the_log_never_shows_gives_up_in_the_bound(
    eventlog: EventLog, monkeypatch
):
    """A request waits for its own write to reach the models; if the log cannot show it
    (a reader stuck behind a gap, say), the wait ends with EventLogUnavailable instead of
    holding the request for ever."""
    await eventlog.append("code-a", 0, [code(1, int(time.time()) + 600)])
    monkeypatch.setattr(eventlog, "timeout", 0.3)
    feed = MemoryFeed(eventlog, [PolicyModel()])
    await feed.catch_up()
    started = time.monotonic()
    with pytest.raises(EventLogUnavailable):
        await feed.wait_for(feed.position + 5)  # positions nobody has written
    assert time.monotonic() - started < 5
    await feed.wait_for(feed.position)  # what is there returns at once


class Counting:
    """A model that counts how often each position reaches it."""

    def __init__(self, after: int = 0) -> None:
        self.position = 0
        self.after = after  # what it saw up to there is not counted
        self.applied: dict[int, int] = {}
        self.seen: list = []

    def apply(self, events) -> None:
        self.seen += [e for e in events if e.position > self.after]
        for recorded in events:
            if recorded.position > self.after:
                self.applied[recorded.position] = self.applied.get(recorded.position, 0) + 1
            self.position = recorded.position


def counting_reads(eventlog: EventLog, monkeypatch) -> list[int]:
    reads: list[int] = []
    real = eventlog.read_all

    async def read_all(after: int = 0, *args, **kwargs):
        reads.append(after)
        return await real(after, *args, **kwargs)

    monkeypatch.setattr(eventlog, "read_all", read_all)
    return reads


def not_announced(feed: MemoryFeed) -> None:
    """The feed as if no batch were announced (too large to be, say): it reads."""
    feed.eventlog.announced.remove(feed.apply_announced)


async def test_what_this_process_commits_is_in_its_models_without_a_read(
    eventlog: EventLog, monkeypatch
):
    model, counting = PolicyModel(), Counting()
    feed = MemoryFeed(eventlog, [model, counting])
    await feed.catch_up()
    reads = counting_reads(eventlog, monkeypatch)
    now = int(time.time())
    positions = await eventlog.append("code-a", 0, [code(1, now + 600), code(2, now + 600)])
    # Applied before the append returned: no read, and the versions a read would give.
    assert reads == []
    assert feed.position == positions[-1] and model.position == positions[-1]
    assert f"{1:064x}" in model.codes and f"{2:064x}" in model.codes
    await feed.catch_up()  # a read after it finds nothing to apply twice
    assert counting.applied == {p: 1 for p in positions}


async def test_an_append_of_any_version_or_after_another_writers_is_left_to_the_read(
    eventlog: EventLog, db, monkeypatch
):
    counting = Counting()
    feed = MemoryFeed(eventlog, [counting])
    not_announced(feed)
    await feed.catch_up()
    other = EventLog(db.pool, db.dsn)  # another process's log, on the same database
    await other.start()
    try:
        now = int(time.time())
        [theirs] = await other.append("code-theirs", 0, [code(1, now + 600)])
        [mine] = await eventlog.append("code-mine", 0, [code(2, now + 600)])
        # Theirs lies between what the models hold and mine: applying mine would skip it.
        assert counting.applied == {} and feed.position < theirs < mine
        [any_version] = await eventlog.append("code-any", None, [code(3, now + 600)])
        await feed.catch_up()
        assert counting.applied == {theirs: 1, mine: 1, any_version: 1}
        [next_mine] = await eventlog.append("code-next", 0, [code(4, now + 600)])
        assert counting.applied[next_mine] == 1 and feed.position == next_mine  # in order again
    finally:
        await other.close()


async def test_a_read_in_flight_does_not_apply_again_what_was_applied_meanwhile(
    eventlog: EventLog, monkeypatch
):
    counting = Counting()
    feed = MemoryFeed(eventlog, [counting])
    await feed.catch_up()
    real, release = eventlog.read_all, asyncio.Event()

    async def late_read(after: int = 0, *args, **kwargs):
        await release.wait()  # asked for before the append, answered after it
        return await real(after, *args, **kwargs)

    monkeypatch.setattr(eventlog, "read_all", late_read)
    reading = asyncio.ensure_future(feed.catch_up())
    await asyncio.sleep(0.05)
    [mine] = await eventlog.append("code-a", 0, [code(1, int(time.time()) + 600)])
    assert counting.applied == {mine: 1}  # applied as it committed
    release.set()
    await reading  # the read brings it back too
    assert counting.applied == {mine: 1} and feed.position == mine


async def test_a_failing_appended_hook_never_fails_or_repeats_the_append(eventlog: EventLog, db):
    def broken(positions, expected_version, events) -> None:
        raise RuntimeError("a reader's bug")

    eventlog.appended.append(broken)
    try:
        positions = await eventlog.append("code-a", 0, [code(1, int(time.time()) + 600)])
    finally:
        eventlog.appended.remove(broken)
    stored = await db.pool.fetch("SELECT position FROM events WHERE stream_id = 'code-a'")
    assert [r["position"] for r in stored] == positions  # committed once, and answered


async def test_a_catch_up_stops_reading_at_a_batch_shorter_than_a_full_one(
    eventlog: EventLog, db, monkeypatch
):
    """Positions are dense and follow commit order, so a short batch reached the head the
    read saw: a process following another's appends reads once per catch-up, not twice."""
    counting = Counting()
    feed = MemoryFeed(eventlog, [counting], batch_size=4)
    not_announced(feed)
    await feed.catch_up()
    other = EventLog(db.pool, db.dsn)  # another process's log: left to the read
    await other.start()
    try:
        now = int(time.time())
        theirs = [(await other.append(f"code-{n}", 0, [code(n, now + 600)]))[0] for n in range(3)]
        reads = counting_reads(eventlog, monkeypatch)
        await feed.catch_up()
        assert len(reads) == 1 and counting.applied == {p: 1 for p in theirs}
        more = [(await other.append(f"code-{n}", 0, [code(n, now + 600)]))[0] for n in range(3, 12)]
        reads.clear()
        await feed.catch_up()  # 4 + 4 + 1: two full batches, then the short one
        assert len(reads) == 3 and counting.applied == {p: 1 for p in theirs + more}
        assert feed.position == more[-1]
        more = [
            (await other.append(f"code-{n}", 0, [code(n, now + 600)]))[0] for n in range(12, 16)
        ]
        reads.clear()
        await feed.catch_up()  # exactly a full batch: the read after it finds the head
        assert len(reads) == 2 and feed.position == more[-1]
    finally:
        await other.close()


def too_large_to_announce(issued: ev.AuthorizationCodeIssued) -> ev.AuthorizationCodeIssued:
    return msgspec.structs.replace(issued, redirect_uri="https://app.example/" + "x" * 8000)


async def following(db) -> EventLog:
    """A process's log that polls once a minute: every read it makes, a notification asked for."""
    eventlog = EventLog(db.pool, db.dsn, poll_interval=60.0)
    await eventlog.start()
    deadline = time.monotonic() + 10
    while eventlog._listener is None or "tollgate_events" not in eventlog._listener._listeners:
        assert time.monotonic() < deadline, "the log's listener never listened"
        await asyncio.sleep(0.01)
    return eventlog


async def following_the_log(feed: MemoryFeed) -> None:
    """Until the feed, started, has had its first look at the log and waits for news."""
    deadline = time.monotonic() + 10
    while feed.eventlog.wakeup._future is None or feed._next is not None:
        assert time.monotonic() < deadline, "the feed never settled"
        await asyncio.sleep(0.01)


async def believed(eventlog: EventLog, other: EventLog) -> int:
    """Until `eventlog` believes what `other` announces: a process checks each backend
    that announces a batch once (its role may append), and reads until then."""
    [warm_up] = await other.append("warm-up", 0, [code(10**9, int(time.time()) + 600)])
    deadline = time.monotonic() + 10
    while other._conn is None or other._conn.get_server_pid() not in eventlog._senders:
        assert time.monotonic() < deadline, "the other writer was never believed"
        await asyncio.sleep(0.01)
    return warm_up


async def until_position(feed: MemoryFeed, position: int, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while feed.position < position:
        assert time.monotonic() < deadline, f"the feed stayed at {feed.position} < {position}"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def beside_another_writer(
    db, *models, follow: bool = True
) -> AsyncIterator[tuple[EventLog, EventLog, MemoryFeed]]:
    """This process's log and feed (following the log, or caught up once), and another
    process's log whose announcements it already believes; `Counting` models count only
    what comes after that."""
    eventlog = await following(db)
    other = EventLog(db.pool, db.dsn)
    await other.start()
    after = await believed(eventlog, other)
    for model in models:
        if isinstance(model, Counting):
            model.after = after
    feed = MemoryFeed(eventlog, list(models))
    try:
        if follow:
            await feed.start()
            await following_the_log(feed)
        else:
            await feed.catch_up()
        yield eventlog, other, feed
    finally:
        await other.close()
        await feed.close()
        await eventlog.close()


async def test_another_processs_commit_reaches_the_models_from_its_notification(db, monkeypatch):
    """No read per commit of another process: the batch comes with its notification."""
    model, counting = PolicyModel(), Counting()
    async with beside_another_writer(db, model, counting) as (eventlog, other, feed):
        reads = counting_reads(eventlog, monkeypatch)
        now = int(time.time())
        theirs = []
        for n in range(5):
            theirs += await other.append(
                f"code-{n}", 0, [code(2 * n, now + 600), code(2 * n + 1, now + 600)]
            )
        await until_position(feed, theirs[-1])
        await asyncio.sleep(0.2)  # a read the notifications started would have run by now
        assert reads == []
        assert counting.applied == {p: 1 for p in theirs}
        assert all(f"{n:064x}" in model.codes for n in range(10))
        # what a read would have given, versions included
        assert counting.seen == await eventlog.read_all(counting.after, 100, lean=True)


async def test_a_writer_that_keeps_announcing_is_believed_without_a_gap(db, monkeypatch):
    """A sender's trust runs out SENDER_TRUST after its check; a writer still announcing
    when half of it has gone is checked again in the background and stays believed, so
    no batch of its is left to a read (and to a round trip of staleness) on the way."""
    counting = Counting()
    async with beside_another_writer(db, counting) as (eventlog, other, feed):
        reads = counting_reads(eventlog, monkeypatch)
        assert other._conn is not None
        sender = other._conn.get_server_pid()
        eventlog._senders[sender] = time.monotonic() + 1.0  # most of its trust gone
        now = int(time.time())
        theirs: list[int] = []
        for n in range(3):
            theirs += await other.append(f"code-{n}", 0, [code(n, now + 600)])
            await until_position(feed, theirs[-1])
            await asyncio.sleep(0.6)  # past the trust it had left, by the last one
        assert reads == []
        assert counting.applied == {p: 1 for p in theirs}
        assert eventlog._senders[sender] > time.monotonic() + SENDER_TRUST / 2


async def test_a_batch_too_large_to_announce_and_what_follows_it_reach_the_models(db, monkeypatch):
    counting = Counting()
    async with beside_another_writer(db, counting) as (eventlog, other, feed):
        reads = counting_reads(eventlog, monkeypatch)
        now = int(time.time())
        large = too_large_to_announce(code(1, now + 600))
        [big] = await other.append("code-big", 0, [large])
        await until_position(feed, big)
        assert len(reads) == 1  # read, its head's notification having woken the feed
        [after] = await other.append("code-after", 0, [code(2, now + 600)])
        await until_position(feed, after)
        await asyncio.sleep(0.2)
        assert len(reads) == 1  # in order again: announced and applied
        assert counting.applied == {big: 1, after: 1}


async def test_an_announced_batch_after_one_not_applied_is_left_to_the_read(db):
    counting = Counting()
    async with beside_another_writer(db, counting, follow=False) as (_, other, feed):
        now = int(time.time())
        [missed] = await other.append("code-a", 0, [too_large_to_announce(code(1, now + 600))])
        [then] = await other.append("code-b", 0, [code(2, now + 600)])
        await asyncio.sleep(0.3)
        # Applying it would skip the one before: it waits for the read.
        assert counting.applied == {} and feed.position < missed
        await feed.catch_up()
        assert counting.applied == {missed: 1, then: 1} and feed.position == then
        assert feed._ahead == {}  # what the read brought is not kept


async def test_a_batch_announced_before_the_answer_to_this_processs_own_commit_waits_for_it(
    db, monkeypatch
):
    """Another process's commit, announced while the answer to this process's own commit
    just before it is still on its way (they come on two connections; this one too large
    to be announced), is applied right after it, without a read."""
    counting = Counting()
    async with beside_another_writer(db, counting, follow=False) as (eventlog, other, feed):
        reads = counting_reads(eventlog, monkeypatch)
        now = int(time.time())
        eventlog.appended.remove(feed.apply_own)  # the answer, held back
        mine_events = [too_large_to_announce(code(1, now + 600))]
        mine = await eventlog.append("code-mine", 0, mine_events)
        [theirs] = await other.append("code-theirs", 0, [code(2, now + 600)])
        deadline = time.monotonic() + 5
        while theirs not in feed._ahead:
            assert time.monotonic() < deadline, "the announcement never came"
            await asyncio.sleep(0.005)
        assert counting.applied == {}  # it would skip mine
        assert feed.apply_own(mine, 0, mine_events)  # the answer arrives
        assert counting.applied == {mine[0]: 1, theirs: 1} and feed.position == theirs
        assert reads == [] and feed._ahead == {}


async def test_a_batch_announced_by_a_session_that_may_not_append_is_not_believed(db):
    """Any session of the database can NOTIFY: a forged batch (a code that was never
    issued, say) from a role that may not write the log never reaches the models."""
    role = f"reader_{os.getpid()}_{time.time_ns()}"
    await db.pool.execute(f"CREATE ROLE {role} LOGIN")
    eventlog = await following(db)
    model, counting = PolicyModel(), Counting()
    feed = MemoryFeed(eventlog, [model, counting])
    await feed.catch_up()
    reader = await asyncpg.connect(db.dsn, user=role)
    try:
        forged = code(666, int(time.time()) + 600)
        tag = "AuthorizationCodeIssued"
        lean = [[feed.position + 1, 1, tag, SCHEMA_VERSIONS[tag], forged]]
        body = msgspec.json.encode(lean).decode()
        await reader.execute(
            "SELECT pg_notify('tollgate_batches', $1)",
            f"{feed.position + 1} {feed.position + 1} {body}",
        )
        await asyncio.sleep(0.5)  # heard, and its sender checked
        assert f"{666:064x}" not in model.codes and counting.applied == {}
        assert reader.get_server_pid() not in eventlog._senders
        # What a writer appends next takes that position, and is what the models get.
        [real] = await eventlog.append("code-real", 0, [code(1, int(time.time()) + 600)])
        await feed.catch_up()
        assert counting.applied == {real: 1} and f"{1:064x}" in model.codes
        assert f"{666:064x}" not in model.codes
    finally:
        await reader.close()
        await eventlog.close()
        await db.pool.execute(f"DROP ROLE {role}")


async def test_a_process_that_heard_nothing_for_longer_than_the_bound_reads_before_deciding(
    db, tmp_path
):
    """A process whose view of the log is older than POLICY_MAX_STALENESS (paused, starved,
    or deaf to notifications) reads the log before it checks a token: a revocation
    committed through another process meanwhile is enforced. Within the bound it decides
    from what it holds."""
    from service.domain import streams
    from service.runtime import open_context
    from service.settings import Settings
    from service.storage.database import Database
    from tests.factories import application, token

    bound = 1.5
    settings = Settings(data_dir=tmp_path, policy_max_staleness=bound)
    database = Database(db.dsn, db.pool)
    app = application("co-heard-nothing", 1)
    issued = token(app, 1)
    key = bytes.fromhex(issued.token_hash)
    revoked = ev.TokenRevoked(company_id=app.company_id, client_id=app.client_id,
                              family_id=issued.family_id, reason="client_request")  # fmt: skip
    async with open_context(settings, database=database) as here:
        await here.eventlog.append(streams.application(app.client_id), 0, [app])
        family = streams.token_family(issued.family_id)
        await here.eventlog.append(family, 0, [issued])
        # There: reads the log once as it opens, and follows nothing after (no listener,
        # no poll), as a process that hears nothing.
        async with open_context(settings, database=database) as there:
            lookups = there.lookups
            assert lookups.access_token_now(key, time.time()) is not None
            await here.eventlog.append(family, 1, [revoked])
            assert await lookups.access_token(key, time.time()) is not None  # within the bound
            await asyncio.sleep(bound + 0.2)
            assert lookups.access_token_now(key, time.time()) is None  # not from memory now
            reads = []
            real_read = there.eventlog.read_all

            async def counted(*args, **kwargs):
                reads.append(args)
                return await real_read(*args, **kwargs)

            there.eventlog.read_all = counted  # type: ignore[method-assign]
            assert await lookups.access_token(key, time.time()) is None  # read: revoked
            assert len(reads) == 1  # the miss is not read for a second time
            assert there.feed.current_within(bound)


async def test_admin_and_resource_server_keys_are_held_to_the_bound_too(db, tmp_path):
    """An admin key or a resource server's key revoked through another process is refused
    here once this process's view is older than the bound: reads of the admin API and
    /policy/check answer from memory too."""
    from service.domain import streams
    from service.runtime import open_context
    from service.settings import Settings
    from service.storage.database import Database

    bound = 1.0
    settings = Settings(data_dir=tmp_path, policy_max_staleness=bound)
    database = Database(db.dsn, db.pool)
    issued = ev.AdminKeyIssued(company_id="co-k", key_id="key-1", key_hash="a" * 64)
    server = ev.ResourceServerRegistered(resource_server_id="rs-1", name="API", key_hash="b" * 64)
    async with open_context(settings, database=database) as here:
        await here.eventlog.append(streams.admin_key("key-1"), 0, [issued])
        await here.eventlog.append(streams.resource_server("rs-1"), 0, [server])
        async with open_context(settings, database=database) as there:
            assert await there.lookups.admin_key("a" * 64) is not None
            assert await there.lookups.resource_server("b" * 64) == "rs-1"
            await here.eventlog.append(
                streams.admin_key("key-1"),
                1,
                [ev.AdminKeyRevoked(company_id="co-k", key_id="key-1")],
            )
            await here.eventlog.append(
                streams.resource_server("rs-1"),
                1,
                [ev.ResourceServerKeyRevoked(resource_server_id="rs-1")],
            )
            await asyncio.sleep(bound + 0.2)
            found = await there.lookups.admin_key("a" * 64)
            assert found is None or found.revoked
            assert await there.lookups.resource_server("b" * 64) is None


@dataclass
class Listening:
    """A process whose pool is small enough to take whole (`pool`), its log (`log`) with a
    listener, a feed of one model (`feed`, `model`), and another process's writer (`other`)."""

    pool: Any
    log: EventLog
    other: EventLog
    model: PolicyModel
    feed: MemoryFeed


@contextlib.asynccontextmanager
async def listening(db, **log_settings: float) -> AsyncIterator[Listening]:
    from service.storage.database import create_pool

    pool = await create_pool(db.dsn, min_size=1, max_size=2)
    writer_pool = await create_pool(db.dsn, min_size=1, max_size=2)
    log = EventLog(pool, db.dsn, **log_settings)
    other = EventLog(writer_pool)
    await log.start()
    await other.start()
    model = PolicyModel()
    feed = MemoryFeed(log, [model])
    await feed.start()
    try:
        yield Listening(pool, log, other, model, feed)
    finally:
        await feed.close()
        await other.close()
        await log.close()
        await writer_pool.close()
        await pool.close()


async def test_a_process_that_hears_every_commit_stays_current_while_its_reads_wait(db):
    """Its pool taken (a burst of requests holding every connection), a process reads
    nothing; while its listener's session answers and every commit's announcement has
    been applied, its view is current all the same, and the gateway goes on deciding. A
    commit it has only heard the head of (not announced) is not in its models: then it
    is not current."""
    async with listening(db, session_check=0.2) as there:
        log, other, model, feed = there.log, there.other, there.model, there.feed
        await log.append("code-1", 0, [code(1, int(time.time()) + 600)])  # the writer's own
        # The other writer's first announcement is checked (may its session append?) and
        # read from the table; from then on its announcements are believed.
        await other.append("code-0", 0, [code(0, int(time.time()) + 600)])
        for _ in range(100):
            if f"{0:064x}" in model.codes and log._senders:
                break
            await asyncio.sleep(0.05)
        async with there.pool.acquire():  # with the writer's, every connection: reads wait
            await other.append("code-2", 0, [code(2, int(time.time()) + 600)])
            await asyncio.sleep(2.0)
            assert f"{2:064x}" in model.codes  # applied from its announcement
            assert feed.current_within(1.5)  # the listener answered since, the head held
            # A commit too large to be announced comes as a head only: not in memory
            big = ev.AuthorizationCodeIssued(
                company_id="c1", client_id="app-1", user_id="u1", code_hash=f"{3:064x}",
                redirect_uri="https://app.example/cb/" + "x" * 9000,
                permissions=["invoices:read"], code_challenge=None,
                expires_at=int(time.time()) + 600,
            )  # fmt: skip
            await other.append("code-3", 0, [big])
            await asyncio.sleep(2.0)
            assert f"{3:064x}" not in model.codes
            assert not feed.current_within(1.5)


async def test_a_commit_made_while_the_listener_was_away_is_no_evidence_of_freshness(db):
    """PostgreSQL notifies only the sessions listening at the commit: one made while the
    listener's session was being replaced never reaches this process. Its new session
    reads the head first, so its round trips no longer vouch for a view that lacks it."""
    admin = await asyncpg.connect(db.dsn)
    try:
        async with listening(db, session_check=0.2, poll_interval=0.5) as there:
            log, feed = there.log, there.feed
            await log.append("code-1", 0, [code(1, int(time.time()) + 600)])
            async with there.pool.acquire():  # every connection held: it reads nothing
                for _ in range(100):
                    if log._listener is not None:
                        break
                    await asyncio.sleep(0.05)
                listener_pid = log._listener.get_server_pid()
                await admin.execute("SELECT pg_terminate_backend($1)", listener_pid)
                await there.other.append("code-2", 0, [code(2, int(time.time()) + 600)])
                for _ in range(100):  # listening again, on a new session
                    listener = log._listener
                    if listener is not None and listener.get_server_pid() != listener_pid:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(2.0)
                assert f"{2:064x}" not in there.model.codes  # unheard
                assert log.wakeup.head > feed.position  # the new session read where the log is
                assert not feed.current_within(1.5)
    finally:
        await admin.close()


async def test_a_listening_session_that_stops_answering_as_it_starts_is_replaced(db):
    """LISTEN and the head read come before the session's round trips are watched: a
    session that goes silent there must not hold the listener for ever (the process
    would be left to polling until restarted)."""
    from structlog.testing import capture_logs

    from tests.integration.stall_proxy import StallProxy

    proxy = await StallProxy(db.dsn).start()
    proxy.stall_on(b"coalesce(max(position), 0) FROM events")  # the head read after LISTEN
    log = EventLog(db.pool, proxy.proxied_dsn, session_check=0.3, poll_interval=0.2)
    with capture_logs() as logs:
        await log.start()
        try:
            for _ in range(100):
                if any(e["event"] == "eventlog.listener_lost" for e in logs):
                    break
                await asyncio.sleep(0.05)
        finally:
            await log.close()
            proxy.resume()
            await proxy.close()
    assert any(e["event"] == "eventlog.listener_lost" for e in logs), logs
