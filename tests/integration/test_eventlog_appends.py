"""The one-statement append: versions, positions and the hash chain decided under the lock
by the database, for writers that do not know the head of the chain.

Marked `eventlog`: CI runs this module once more against a second PostgreSQL major version.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import asyncpg
import msgspec
import pytest

from service import events as ev
from service.audit.verify import verify_log
from service.eventlog import ConcurrencyError, EventLog, Metadata, chain, decode_lean
from service.eventlog.appends import APPEND, APPEND_PACKED, Append, Plan
from service.storage import packed as packing
from service.storage.database import create_pool, schema_sql
from service.storage.packed import NULL, SEPARATOR

pytestmark = pytest.mark.eventlog

# What JSON escapes, what it does not (non-ASCII), and what PostgreSQL's own JSON output
# would write differently: the chain must cover the bytes as Tollgate wrote them.
AWKWARD = 'q"uote\\back/slash\nnew\ttab\u0001ctl é 漢字 😀 \u2028'


def company(n: int, name: str = "") -> ev.CompanyCreated:
    return ev.CompanyCreated(company_id=f"c{n}{name}", name=f"Company {n}{name}")


async def test_writers_that_never_saw_each_others_appends_leave_one_intact_chain(db):
    """Two writers (as two processes) interleave their batches; each chains onto the head
    the other left without having read it, awkward text included."""
    pools = [await create_pool(db.dsn, min_size=1, max_size=2) for _ in range(2)]
    logs = [EventLog(pool) for pool in pools]
    for log in logs:
        await log.start()
    try:

        async def write(w: int, log: EventLog) -> list[list[int]]:
            meta = Metadata(actor=f"user:{AWKWARD}", request_id=f"r{w}", client_ip="192.0.2.1")
            return await asyncio.gather(
                *(
                    log.append(f"w{w}-{n}-{AWKWARD}", 0, [company(n, AWKWARD)] * 2, meta)
                    for n in range(300)
                )
            )

        results = await asyncio.gather(*(write(w, log) for w, log in enumerate(logs)))
    finally:
        for log in logs:
            await log.close()
        for pool in pools:
            await pool.close()
    positions = sorted(p for per_writer in results for append in per_writer for p in append)
    assert positions == list(range(1, 1201))
    assert all(b == a + 1 for per_writer in results for a, b in per_writer)
    assert sum(log.batches_committed for log in logs) < 600  # group commit at work
    result = await verify_log(db.pool)
    assert result.ok and result.checked == 1200


async def test_a_stream_taken_for_new_that_exists_fails_alone_in_its_batch(eventlog: EventLog, db):
    assert await eventlog.append("existing", 0, [company(0)]) == [1]
    results = await asyncio.gather(
        eventlog.append("new-1", 0, [company(1)]),
        eventlog.append("existing", 0, [company(2)]),  # expected new: it is not
        eventlog.append("new-2", 0, [company(3)]),
        return_exceptions=True,
    )
    assert results[0] == [2] and results[2] == [3]
    assert isinstance(results[1], ConcurrencyError)
    assert (results[1].stream_id, results[1].expected, results[1].actual) == ("existing", 0, 1)
    assert (await verify_log(db.pool)).ok


async def test_appends_in_one_batch_see_the_versions_the_ones_before_them_left(
    eventlog: EventLog, db
):
    results = await asyncio.gather(
        eventlog.append("app", 0, [company(1)]),
        eventlog.append("app", 1, [company(2)]),  # after the first, in the same batch
        eventlog.append("token", 0, [company(3)], conditions=[("app", 2)]),
        eventlog.append("token-stale", 0, [company(4)], conditions=[("app", 1)]),
        eventlog.append("app", None, [company(5)]),
        return_exceptions=True,
    )
    assert results[:3] == [[1], [2], [3]]
    assert isinstance(results[3], ConcurrencyError)
    assert (results[3].stream_id, results[3].expected, results[3].actual) == ("app", 1, 2)
    assert results[4] == [4]
    assert [r.version for r in await eventlog.read_stream("app")] == [1, 2, 3]
    assert (await verify_log(db.pool)).ok


async def test_a_lost_reply_is_answered_as_the_log_holds_the_batch(
    eventlog: EventLog, db, monkeypatch
):
    """The reply to a batch is lost after it committed without one of its appends (a
    version had moved): the others are reported at their positions, not written twice,
    and the one left out is refused as a conflict."""
    from tests.integration.test_eventlog import lose_the_next_reply

    assert await eventlog.append("app", 0, [company(0)]) == [1]
    lost = lose_the_next_reply(monkeypatch)
    results = await asyncio.gather(
        eventlog.append("any", None, [company(1)]),
        eventlog.append("app", 5, [company(2)]),
        eventlog.append("new", 0, [company(3)]),
        return_exceptions=True,
    )
    assert not lost[0].armed  # the reply was indeed lost
    assert results[0] == [2] and results[2] == [3]
    assert isinstance(results[1], ConcurrencyError) and results[1].actual == 1
    async with db.pool.acquire() as conn:
        rows = await conn.fetch("SELECT stream_id, version FROM events ORDER BY position")
    assert [(r["stream_id"], r["version"]) for r in rows] == [("app", 1), ("any", 1), ("new", 1)]
    assert (await verify_log(db.pool)).ok


async def test_a_batch_of_many_appends_keeps_each_streams_version_as_it_goes(
    eventlog: EventLog, db
):
    """Hundreds of appends in one batch, streams repeated and named by conditions: each
    distinct stream's version is tracked through the batch (by its number, schema.sql)."""
    assert await eventlog.append("app", 0, [company(0)]) == [1]
    appends = []
    for n in range(200):
        appends += [
            eventlog.append(f"s{n}", 0, [company(n)]),
            eventlog.append(f"s{n}", 1, [company(n)] * 2),
            eventlog.append(f"t{n}", 0, [company(n)], conditions=[(f"s{n}", 3), ("app", 1)]),
            eventlog.append(f"u{n}", 0, [company(n)], conditions=[(f"s{n}", 1)]),  # moved
        ]
    results = await asyncio.gather(*appends, return_exceptions=True)
    assert eventlog.batches_committed < 20  # a few large batches
    for n in range(200):
        s1, s2, t, u = results[4 * n : 4 * n + 4]
        assert len(s1) == 1 and len(s2) == 2 and len(t) == 1
        assert isinstance(u, ConcurrencyError) and (u.stream_id, u.actual) == (f"s{n}", 3)
    assert [r.version for r in await eventlog.read_stream("s199")] == [1, 2, 3]
    result = await verify_log(db.pool)
    assert result.ok and result.checked == 1 + 200 * 4


def plan_of(*appends: tuple[str, list[ev.Event], list[tuple[str, int]]]) -> Plan:
    loop = asyncio.new_event_loop()
    try:
        return Plan.build([
            Append(stream, 0, events, Metadata(), conditions, loop.create_future())
            for stream, events, conditions in appends
        ])  # fmt: skip
    finally:
        loop.close()


def test_a_batch_travels_packed_unless_a_raw_text_would_not_split_back():
    """Each array goes as one text, split by the database; a stream id, condition stream or
    company holding the separator or the NULL mark, or a lone empty company, would split
    into other elements, and such a batch goes as arrays."""
    plain = plan_of(("s", [company(1, AWKWARD)], [("app", 1)]))
    assert plain.statement == APPEND_PACKED
    assert plain.args[0] == "s" and plain.args[1] == "{0}" and plain.args[-1] == plain.recorded_at
    assert plain.args[9] == plain.arrays[9] and len(plain.args[9]) == 32  # the digest, as bytes
    for stream, event, conditions in [
        (f"s{SEPARATOR}t", company(1), []),
        (f"s{NULL}t", company(1), []),
        ("s", company(1), [(f"app{SEPARATOR}", 1)]),
        ("s", ev.CompanyCreated(company_id=f"c{SEPARATOR}1", name="C"), []),
        ("s", ev.CompanyCreated(company_id=f"c{NULL}", name="C"), []),
        ("s", ev.CompanyCreated(company_id="", name="C"), []),
    ]:
        plan = plan_of((stream, [event], conditions))
        assert plan.statement == APPEND and plan.args == plan.arrays, (stream, event)
    # Two empty companies are two elements: "" and "" around one separator.
    two = plan_of(("s", [ev.CompanyCreated(company_id="", name="C")] * 2, []))
    assert two.statement == APPEND_PACKED


async def test_packed_and_unpackable_batches_are_written_as_given(eventlog: EventLog, db):
    """Through both statements, every text arrives as it was sent: stream ids with control
    characters (the separator and the NULL mark among them), a company that is NULL, one
    that is empty, versions, conditions and conflicts; and the chain covers them."""
    server = ev.ResourceServerRegistered(resource_server_id="rs", name=AWKWARD, key_hash="k")
    appends = [
        ("app", 0, [company(0, AWKWARD)], []),
        ("plain", 0, [server, company(1)], [("app", 1)]),
        (f"sep{SEPARATOR}arated", 0, [company(2)], []),
        (f"null{NULL}mark", 0, [server], [("app", 1)]),
        ("empty-company", 0, [ev.CompanyCreated(company_id="", name="C")], []),
        ("stale", 0, [company(3)], [("app", 0)]),
    ]
    for packed_first in (True, False):  # the batch with the odd streams, then without
        results = await asyncio.gather(
            *(
                eventlog.append(
                    f"{stream}-{packed_first}",
                    expected,
                    events,
                    conditions=[(f"{s}-{packed_first}", v) for s, v in conditions],
                )
                for stream, expected, events, conditions in (
                    appends
                    if packed_first
                    else [a for a in appends if a[0] in ("app", "plain", "stale")]
                )
            ),
            return_exceptions=True,
        )
        assert isinstance(results[-1], ConcurrencyError) and results[-1].actual == 1
        assert all(isinstance(r, list) for r in results[:-1]), results
    rows = await db.pool.fetch(
        "SELECT stream_id, version, type, company_id, payload::text FROM events ORDER BY position"
    )
    written = [(r["stream_id"], r["version"], r["type"], r["company_id"]) for r in rows]
    assert written == [
        ("app-True", 1, "CompanyCreated", f"c0{AWKWARD}"),
        ("plain-True", 1, "ResourceServerRegistered", None),
        ("plain-True", 2, "CompanyCreated", "c1"),
        (f"sep{SEPARATOR}arated-True", 1, "CompanyCreated", "c2"),
        (f"null{NULL}mark-True", 1, "ResourceServerRegistered", None),
        ("empty-company-True", 1, "CompanyCreated", ""),
        ("app-False", 1, "CompanyCreated", f"c0{AWKWARD}"),
        ("plain-False", 1, "ResourceServerRegistered", None),
        ("plain-False", 2, "CompanyCreated", "c1"),
    ]
    # The exact bytes Tollgate encoded, awkward text included.
    assert [r["payload"] for r in rows[:2]] == [
        ev.encode(company(0, AWKWARD)).decode(),
        ev.encode(server).decode(),
    ]
    result = await verify_log(db.pool)
    assert result.ok and result.checked == 9


def previous_arrays(plan: Plan) -> tuple[Any, ...]:
    """The batch as the previous version sent it to `events_append`: with each append's
    stream as JSON (2nd) and, for each event, what its hash covered after its version
    (11th) instead of the digests, as that version's writer encoded them."""
    (streams, expected, counts, slots, condition_of, condition_slots, condition_streams,
     condition_versions, event_of, _digests, types, schema_versions, companies, payloads,
     metadata, recorded_at) = plan.arrays  # fmt: skip
    stamp = msgspec.json.encode(chain.timestamp(recorded_at)).decode()
    tails = [
        f",{msgspec.json.encode([t, v, c])[1:-1].decode()},{p},{m},{stamp}]"
        for t, v, c, p, m in zip(types, schema_versions, companies, payloads, metadata, strict=True)
    ]
    stream_json = [msgspec.json.encode(s).decode() for s in streams]
    return (streams, stream_json, expected, counts, slots, condition_of, condition_slots,
            condition_streams, condition_versions, event_of, tails, types, schema_versions,
            companies, payloads, metadata, recorded_at)  # fmt: skip


def mixed_batch(loop: asyncio.AbstractEventLoop, after: int, name: str) -> Plan:
    """Appends after `after` events of stream "app": two in turn, a new stream `name` on a
    condition that holds, one on a condition that moved, and one at any version (awkward
    text in a stream, a payload and metadata)."""
    return Plan.build([
        Append("app", after, [company(1)], Metadata(), (), loop.create_future()),
        Append("app", after + 1, [company(2, AWKWARD)], Metadata(), (), loop.create_future()),
        Append(f"{name}{AWKWARD}", 0, [company(3)], Metadata(actor=AWKWARD),
               [("app", after + 2)], loop.create_future()),
        Append("stale", 0, [company(4)], Metadata(), [("app", 1)], loop.create_future()),
        Append("app", None, [company(5)] * 2, Metadata(), (), loop.create_future()),
    ])  # fmt: skip


async def test_processes_of_the_two_versions_before_append_as_they_did(eventlog: EventLog, db):
    """While hosts are rolled one at a time, a process of the previous version calls
    `events_append` (or its packed form) with what the hash covers after each version, and
    one of the version before it without the streams' numbers either: versions, conditions
    and conflicts are decided as before, and their events chain on as the new version's do,
    leaving one intact chain."""
    async with db.pool.acquire() as conn:
        # A database that had the function two versions back: the schema replaces it (in
        # another language), as a start of the new version does.
        await conn.execute(
            f"DROP FUNCTION events_append({', '.join(OLD_SIGNATURE)}); "
            f"CREATE FUNCTION events_append({', '.join(OLD_SIGNATURE)}) RETURNS text "
            "LANGUAGE plpgsql AS $$ BEGIN RETURN '[]'; END $$"
        )
        await conn.execute(schema_sql())
    assert await eventlog.append("app", 0, [company(0)]) == [1]
    loop = asyncio.get_running_loop()
    previous = previous_arrays(mixed_batch(loop, 5, "packed"))
    # Packed as that version packed it: raw texts (stream ids, condition streams, types,
    # companies), JSON texts, integers.
    packed = [
        packing.texts(array) if n in (0, 7, 11, 13)
        else packing.clean_texts(array) if n in (1, 10, 14, 15)
        else packing.numbers(array)
        for n, array in enumerate(previous[:-1])
    ] + [previous[-1]]  # fmt: skip
    # Two versions back: without p_slots (5th) and p_condition_slots (7th).
    arrays = previous_arrays(mixed_batch(loop, 1, "arrays"))
    before = previous_arrays(mixed_batch(loop, 9, "before"))
    before = tuple(a for n, a in enumerate(before) if n not in (4, 6))
    calls = [("events_append", arrays), ("events_append_packed", tuple(packed)),
             ("events_append", before)]  # fmt: skip
    answers = []
    async with db.pool.acquire() as conn:
        for function, args in calls:
            placeholders = ", ".join(f"${n}" for n in range(1, len(args) + 2))
            answers.append(await conn.fetchval(f"SELECT {function}({placeholders})", *args, False))
    assert answers == [
        '[2,3,4,["app",1,3],5]', '[7,8,9,["app",1,7],10]', '[12,13,14,["app",1,11],15]'
    ]  # fmt: skip
    assert [r.version for r in await eventlog.read_stream("app")] == list(range(1, 14))
    result = await verify_log(db.pool)
    assert result.ok and result.checked == 16
    # The same chain as the new version's own appends leave: one form of link throughout.
    rows = await db.pool.fetch("SELECT * FROM events ORDER BY position")
    previous_hash = chain.GENESIS
    for row in rows:
        content = chain.stored_content(row)
        previous_hash = chain.event_hash(previous_hash, row["position"], row["version"], content)
        assert bytes(row["hash"]) == previous_hash, row["position"]


OLD_SIGNATURE = (
    "text[]", "text[]", "integer[]", "integer[]", "integer[]", "text[]", "integer[]",
    "integer[]", "text[]", "text[]", "smallint[]", "text[]", "text[]", "text[]",
    "timestamptz", "boolean",
)  # fmt: skip


async def test_a_batch_is_announced_with_its_events_as_a_lean_read_gets_them(db):
    """What `tollgate_batches` carries is what a lean read of the batch gives, awkward text
    included; an append refused for its version is not in it; a batch too large for a
    notification goes out in pieces, and an event too large for one is left to the read."""
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    listener = await asyncpg.connect(db.dsn)
    await listener.add_listener("tollgate_batches", lambda *a: heard.put_nowait((a[2], a[3])))
    await listener.add_listener("tollgate_events", lambda *a: heard.put_nowait((a[2], a[3])))
    log = EventLog(db.pool)
    await log.start()
    try:
        await log.append("before", 0, [company(0)])
        await asyncio.wait_for(heard.get(), 5)
        await asyncio.wait_for(heard.get(), 5)
        results = await asyncio.gather(
            log.append(f"s-{AWKWARD}", 0, [company(1, AWKWARD), company(2, AWKWARD)]),
            log.append("before", 0, [company(3)]),  # stale: refused, not announced
            log.append("s-2", 0, [company(4)]),
            return_exceptions=True,
        )
        assert isinstance(results[1], ConcurrencyError)
        [(channel, announcement), (head_channel, head)] = [
            await asyncio.wait_for(heard.get(), 5) for _ in range(2)
        ]
        assert (channel, head_channel) == ("tollgate_batches", "tollgate_events")
        first, last, events = announcement.split(" ", 2)
        assert (int(first), int(last), int(head)) == (2, 4, 4)
        announced = decode_lean(events)
        read = await log.read_all(1, 10, lean=True)
        assert announced == read and [r.position for r in read] == [2, 3, 4]
        assert [r.version for r in read] == [1, 2, 1]
        # A batch larger than a notification goes out in pieces, each under 8000 bytes.
        many = [company(n, "-" + "y" * 300) for n in range(60)]
        positions = await log.append("s-many", 0, many)
        pieces = []
        while (heard_now := await asyncio.wait_for(heard.get(), 5))[0] == "tollgate_batches":
            assert len(heard_now[1].encode()) < 8000
            pieces.append(heard_now[1].split(" ", 2))
        assert heard_now == ("tollgate_events", str(positions[-1])) and len(pieces) > 2
        assert int(pieces[0][0]) == positions[0]
        assert all(int(a[1]) + 1 == int(b[0]) for a, b in itertools.pairwise(pieces))
        assert int(pieces[-1][1]) == positions[-1]
        announced = [r for _, _, events in pieces for r in decode_lean(events)]
        assert announced == await log.read_all(positions[0] - 1, 100, lean=True)
        # An event too large for one is not announced, nor what follows it in its batch:
        # they are read.
        big = ev.CompanyCreated(company_id="c-big", name="x" * 7900)
        small = company(99)
        first, _ = await asyncio.gather(
            log.append("s-s", 0, [small]), log.append("s-big", 0, [big])
        )
        [(channel, piece), head] = [await asyncio.wait_for(heard.get(), 5) for _ in range(2)]
        assert channel == "tollgate_batches" and piece.startswith(f"{first[0]} {first[0]} ")
        assert head == ("tollgate_events", str(first[0] + 1))
        assert heard.empty()
    finally:
        await log.close()
        await listener.close()


async def test_batches_are_not_announced_while_the_notification_queue_fills(db):
    """A listener that stops reading (here: inside a transaction left open) keeps every
    notification in the queue, and a full queue would fail every append: past
    `tollgate.announce_below` of it, a commit sends its head alone, not its events."""
    stuck = await asyncpg.connect(db.dsn)
    await stuck.execute("LISTEN tollgate_batches")
    held = stuck.transaction()
    await held.start()
    await stuck.execute("SELECT 1")  # no notification reaches it until this ends
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    listener = await asyncpg.connect(db.dsn)
    await listener.add_listener("tollgate_batches", lambda *a: heard.put_nowait((a[2], a[3])))
    await listener.add_listener("tollgate_events", lambda *a: heard.put_nowait((a[2], a[3])))
    # any usage at all is past this bound (the default, 0.05, is 400 MB of the 8 GB queue)
    pool = await asyncpg.create_pool(
        db.dsn, min_size=1, max_size=2, server_settings={"tollgate.announce_below": "1e-9"}
    )
    log = EventLog(pool)
    await log.start()
    try:
        for n in range(400):  # announced while the queue's pages in use are none
            if await db.pool.fetchval("SELECT pg_notification_queue_usage()") > 0:
                break
            [position] = await log.append(f"q-{n}", 0, [company(n, "-" + "q" * 300)])
            while await asyncio.wait_for(heard.get(), 5) != ("tollgate_events", str(position)):
                pass
        else:
            pytest.fail("the queue never filled a page")
        [position] = await log.append("q-last", 0, [company(999)])
        # in commit order: an announcement would come before the head
        assert await asyncio.wait_for(heard.get(), 5) == ("tollgate_events", str(position))
        assert [r.position for r in await log.read_all(position - 1, 10)] == [position]
    finally:
        await log.close()
        await pool.close()
        await listener.close()
        await held.rollback()
        await stuck.close()


@pytest.mark.parametrize("bound", ["5%", "2e-0", "1e999"])
async def test_a_mistyped_announce_bound_leaves_the_default_and_fails_no_append(db, bound):
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    listener = await asyncpg.connect(db.dsn)
    await listener.add_listener("tollgate_batches", lambda *a: heard.put_nowait((a[2], a[3])))
    pool = await asyncpg.create_pool(
        db.dsn, min_size=1, max_size=2, server_settings={"tollgate.announce_below": bound}
    )
    log = EventLog(pool)
    await log.start()
    try:
        [position] = await log.append("typo", 0, [company(1)])
        _channel, announcement = await asyncio.wait_for(heard.get(), 5)
        assert announcement.startswith(f"{position} {position} ")
    finally:
        await log.close()
        await pool.close()
        await listener.close()


async def test_the_projections_process_hears_the_head_and_not_the_announced_events(db, tmp_path):
    """`tollgate projections run` reads what it applies from the table: its listener wakes
    on each commit's head, and the events announced with each commit are not copied to it
    (a notification of up to 8000 bytes a commit); a log kept in memory hears them."""
    from service.cli import _with_runner
    from service.settings import Settings

    async def body(runner: Any) -> int:
        quiet: EventLog = runner.eventlog
        heard: list[tuple[int, int]] = []
        quiet.announced.append(lambda first, last, _events: heard.append((first, last)))
        loud = EventLog(db.pool, db.dsn)
        told: list[tuple[int, int]] = []
        loud.announced.append(lambda first, last, _events: told.append((first, last)))
        await loud.start()
        try:
            for log in (quiet, loud):
                while log._listener is None or "tollgate_events" not in log._listener._listeners:
                    await asyncio.sleep(0.01)
            assert await loud.append("s", 0, [company(0), company(1)]) == [1, 2]
            async with asyncio.timeout(5):  # the first is believed once its sender is checked
                while quiet.wakeup.head < 2 or not loud._senders:
                    await asyncio.sleep(0.01)
            assert await loud.append("s", 2, [company(2)]) == [3]
            async with asyncio.timeout(5):
                while quiet.wakeup.head < 3 or not told:
                    await asyncio.sleep(0.01)
        finally:
            await loud.close()
        assert told == [(3, 3)] and heard == []
        return 0

    settings = Settings(data_dir=tmp_path, database_url=db.dsn)
    assert await _with_runner(settings, body, listen=True) == 0


async def test_a_batch_whose_digests_do_not_match_its_events_writes_nothing(db):
    """Each event needs its 32-byte digest: a call with too few or too many bytes (a
    writer's bug) is refused before the lock is taken, as a value the database refuses
    (class 22), and nothing of it is written."""
    loop = asyncio.get_running_loop()
    plan = Plan.build([Append("s", 0, [company(0)] * 2, Metadata(), (), loop.create_future())])
    args = list(plan.args)
    async with db.pool.acquire() as conn:
        for digests in (args[9][:32], args[9] + bytes(32), b""):
            args[9] = digests
            with pytest.raises(asyncpg.InvalidParameterValueError, match="p_digests holds"):
                await conn.fetchval(plan.statement, *args, False)
        assert await conn.fetchval("SELECT count(*) FROM events") == 0
        args[9] = plan.args[9]
        assert await conn.fetchval(plan.statement, *args, False) == "[1]"


async def waiting_for_the_writers_lock(holder: asyncpg.Connection) -> None:
    """Returns once a batch is on the server, waiting for the writers' lock, which the
    session `holder` holds."""
    waiting = (
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'events_writer'::regclass"
    )
    for _ in range(200):
        if await holder.fetchval(waiting):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no batch waited for the writers' lock")


@pytest.mark.parametrize("expected", [None, 0])
async def test_a_batch_whose_connection_breaks_while_it_waits_for_the_lock_is_written_once(
    db, expected
):
    """The writer's connection breaks while its batch waits for the writers' lock (another
    process's long batch holds it): the server's session does not notice and would commit
    the batch once the lock is free. A look at the log before then finds nothing; a retry
    would then write every event twice, or (expected version 0) find them there and
    refuse appends that are in the log. The session is ended first, so the look is sure."""
    from tests.integration.stall_proxy import StallProxy

    proxy = await StallProxy(db.dsn).start()
    pool = await create_pool(proxy.proxied_dsn, min_size=1, max_size=4)
    log = EventLog(pool)
    await log.start()
    holder = await asyncpg.connect(db.dsn)
    try:
        assert await log.append("first", 0, [company(0)]) == [1]
        held = holder.transaction()
        await held.start()
        await holder.execute("LOCK TABLE events_writer IN EXCLUSIVE MODE")
        appends = [
            asyncio.create_task(log.append(stream, expected, [company(n)]))
            for n, stream in enumerate(["a", "b"], 1)
        ]
        await waiting_for_the_writers_lock(holder)  # the batch is on the server
        proxy.cut()
        await asyncio.sleep(0.5)  # the writer has seen its connection break
        await held.commit()
        results = await asyncio.gather(*appends, return_exceptions=True)
        rows = await holder.fetch("SELECT stream_id, version FROM events ORDER BY position")
    finally:
        await holder.close()
        await log.close()
        await pool.close()
        await proxy.close()
    assert [(r["stream_id"], r["version"]) for r in rows] == [("first", 1), ("a", 1), ("b", 1)]
    assert sorted(results) == [[2], [3]], results  # each written once, and reported so
    assert (await verify_log(db.pool)).ok


async def test_a_lost_reply_credits_each_append_with_its_own_rows(
    eventlog: EventLog, db, monkeypatch
):
    """A stale append and a later one writing the same event to the same stream share a
    batch whose reply is lost after it committed: the row is the later one's (its version
    says so), the stale one is refused, and nothing is written twice."""
    from tests.integration.test_eventlog import lose_the_next_reply

    assert await eventlog.append("s", 0, [company(0)]) == [1]
    lost = lose_the_next_reply(monkeypatch)
    same = company(1)
    results = await asyncio.gather(
        eventlog.append("s", 5, [same]),  # stale: refused
        eventlog.append("s", None, [same]),
        return_exceptions=True,
    )
    assert not lost[0].armed  # the reply was indeed lost
    assert isinstance(results[0], ConcurrencyError) and results[0].actual == 2
    assert results[1] == [2]
    assert [e.version for e in await eventlog.read_stream("s")] == [1, 2]
    assert (await verify_log(db.pool)).ok


async def test_a_lost_reply_that_cannot_tell_two_appends_apart_says_so(
    eventlog: EventLog, db, monkeypatch
):
    """Two appends of one batch write the same event to the same stream at any version, and
    the first is refused (a condition): after a lost reply the row could be either one's.
    Neither caller is told a guess: both hear that the append may or may not be written."""
    from service.eventlog import EventLogUnavailable
    from tests.integration.test_eventlog import lose_the_next_reply

    assert await eventlog.append("app", 0, [company(0)]) == [1]
    lost = lose_the_next_reply(monkeypatch)
    same = company(1)
    results = await asyncio.gather(
        eventlog.append("s", None, [same], conditions=[("app", 7)]),  # refused
        eventlog.append("s", None, [same]),
        return_exceptions=True,
    )
    assert not lost[0].armed
    assert all(isinstance(r, EventLogUnavailable) for r in results), results
    assert all("may or may not be written" in str(r) for r in results)
    assert [e.version for e in await eventlog.read_stream("s")] == [1]  # written once


async def test_an_append_on_the_server_when_the_log_closes_may_or_may_not_be_written(db):
    """Closed while its batch waits on the server (for the writers' lock): the caller is not
    told that nothing was written, which the server may yet prove wrong."""
    from service.eventlog import EventLogUnavailable

    log = EventLog(db.pool)
    await log.start()
    holder = await asyncpg.connect(db.dsn)
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute("LOCK TABLE events_writer IN EXCLUSIVE MODE")
        append = asyncio.create_task(log.append("s", 0, [company(1)]))
        await waiting_for_the_writers_lock(holder)
        await log.close()
        with pytest.raises(EventLogUnavailable, match="may or may not be written"):
            await append
        await held.rollback()
    finally:
        await holder.close()
        await log.close()
