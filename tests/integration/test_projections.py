"""Projection runner: exactly-once application across crashes, rebuild, single instance."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import pytest
from msgspec.structs import replace

from projections.catalog import sql_projections
from projections.runner import ProjectionRunner, lock_key
from projections.tokens import _DELETE_FAMILIES
from service import events as ev
from service.domain.streams import lone_family
from service.eventlog import EventLog
from service.storage.database import apply_schema
from service.storage.packed import SEPARATOR
from tests.factories import application, companies, cut_tail, populate, token

TABLES = {
    "applications": "SELECT * FROM applications ORDER BY client_id",
    "live_tokens": "SELECT * FROM live_tokens ORDER BY token_hash",
    "event_stats": "SELECT * FROM event_stats ORDER BY day, type",
}


async def snapshot(pool: asyncpg.Pool) -> dict[str, list[tuple]]:
    return {name: [tuple(r) for r in await pool.fetch(sql)] for name, sql in TABLES.items()}


def runner_for(eventlog: EventLog, db, batch_size: int = 5000) -> ProjectionRunner:
    return ProjectionRunner(eventlog, db.pool, db.dsn, sql_projections(), batch_size=batch_size)


def tollgate(db, *args: str, batch: int = 5000, **kwargs) -> subprocess.Popen:
    env = {
        **os.environ,
        "DATABASE_URL": db.dsn,
        "PROJECTION_BATCH_SIZE": str(batch),
        "LOG_FORMAT": "json",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "service", *args],
        env=env,
        **({"stdout": subprocess.PIPE, "stderr": subprocess.PIPE} | kwargs),
    )


async def test_projection_tables_reflect_the_log(eventlog: EventLog, db):
    head = await populate(eventlog, tokens=600)
    runner = runner_for(eventlog, db, batch_size=97)
    for name in runner.projections:
        assert await runner.catch_up(name) == head
    apps = await db.pool.fetch("SELECT client_id FROM applications")
    assert len(apps) == 11  # 12 created, one deleted
    families = await db.pool.fetchval("SELECT count(*) FROM live_tokens")
    revoked = await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'TokenRevoked'")
    issued = await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'AccessTokenIssued'")
    assert 0 < families < issued - revoked  # the deleted app and revoked connection took more
    stats = await db.pool.fetchval("SELECT sum(count) FROM event_stats")
    assert stats == head
    # no token of the deleted application or the revoked connection survives
    assert not await db.pool.fetchval(
        "SELECT count(*) FROM live_tokens WHERE client_id = 'co2-app3'"
    )
    assert not await db.pool.fetchval(
        "SELECT count(*) FROM live_tokens WHERE company_id = 'co0' AND client_id = 'co0-app1'"
    )
    for status in await runner.status():
        assert status.lag_events == 0
        assert status.position == head


class _Durability:
    """A projection that notes the synchronous_commit its batches run under."""

    name = "durability_probe"
    tables = ()
    event_types = None
    lean = True

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def apply(self, conn, events) -> None:
        self.seen.append(await conn.fetchval("SELECT current_setting('synchronous_commit')"))


async def test_a_batch_commits_without_waiting_for_its_flush_and_appends_still_wait(
    eventlog: EventLog, db
):
    """A projection's rows are derived and replayed after a crash: its batch does not wait
    for the WAL flush; the setting ends with the batch, so the pool's connections (and the
    appends) keep waiting for theirs."""
    head = await populate(eventlog, tokens=30)
    probe = _Durability()
    # The test cluster skips flushes altogether (synchronous_commit=off for every session):
    # these connections wait for theirs, as on a durable server.
    durable = {"synchronous_commit": "on"}
    setting = "SELECT current_setting('synchronous_commit')"
    async with asyncpg.create_pool(db.dsn, min_size=2, max_size=2, server_settings=durable) as pool:
        runner = ProjectionRunner(eventlog, pool, db.dsn, [probe], batch_size=7)
        await runner.ensure_checkpoints()
        assert await runner.catch_up(probe.name) == head
        assert len(probe.seen) > 1
        assert set(probe.seen) == {"off"}
        async with pool.acquire() as a, pool.acquire() as b:  # every pooled connection
            assert [await a.fetchval(setting), await b.fetchval(setting)] == ["on", "on"]


async def test_crash_between_batches_then_restart_equals_a_rebuild(eventlog: EventLog, db):
    head = await populate(eventlog, tokens=8000, chunk=1000)
    worker = tollgate(db, "projections", "run", batch=40)
    try:
        # SIGKILL the worker while it is in the middle of catching up.
        positions: list[int] = []
        for _ in range(2000):
            positions = [
                r["position"]
                for r in await db.pool.fetch("SELECT position FROM projection_checkpoints")
            ]
            if positions and any(0 < p < head for p in positions) and max(positions) > 200:
                break
            await asyncio.sleep(0.01)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert any(0 < p < head for p in positions), positions  # it really died mid-way

    restart = tollgate(db, "projections", "run", "--until-caught-up")
    assert restart.wait(60) == 0, restart.stderr.read()
    resumed = await snapshot(db.pool)

    rebuild = tollgate(db, "projections", "rebuild")
    _out, err = rebuild.communicate(timeout=60)
    assert rebuild.returncode == 0, err
    assert await snapshot(db.pool) == resumed
    assert sum(r[2] for r in resumed["event_stats"]) == head  # each event counted once


async def test_rebuild_while_a_worker_runs_gives_the_same_tables(eventlog: EventLog, db):
    await populate(eventlog, tokens=1500)
    live = runner_for(eventlog, db, batch_size=200)
    task = asyncio.create_task(live.run_forever())
    try:
        for _ in range(500):
            if all(s.lag_events == 0 for s in await live.status()):
                break
            await asyncio.sleep(0.02)
        before = await snapshot(db.pool)
        other = runner_for(eventlog, db, batch_size=300)
        for name in other.projections:
            await other.rebuild(name)
        app = application("co0", 0)  # the running worker keeps up with later events
        for n in range(10):
            tok = token(app, 10_000 + n)
            await eventlog.append(f"token-{tok.family_id}", 0, [tok])
        for _ in range(500):
            if all(s.lag_events == 0 for s in await live.status()):
                break
            await asyncio.sleep(0.02)
        after = await snapshot(db.pool)
    finally:
        task.cancel()
    assert after["applications"] != []
    assert len(after["live_tokens"]) >= len(before["live_tokens"])
    fresh = runner_for(eventlog, db)
    for name in fresh.projections:
        await fresh.rebuild(name)
    assert await snapshot(db.pool) == after


async def test_only_one_instance_of_a_projection_runs(eventlog: EventLog, db):
    await populate(eventlog, tokens=50)
    first = runner_for(eventlog, db)
    second = runner_for(eventlog, db)
    holder = await asyncpg.connect(db.dsn)
    try:
        # Another process holds the "tokens" lock: this runner must not touch it.
        await holder.execute("SELECT pg_advisory_lock($1)", lock_key("tokens"))
        task = asyncio.create_task(first.run_forever())
        for _ in range(300):
            status = {s.name: s for s in await first.status()}
            if status["applications"].lag_events == 0:
                break
            await asyncio.sleep(0.02)
        assert status["applications"].lag_events == 0
        assert status["tokens"].position == 0
        await holder.execute("SELECT pg_advisory_unlock($1)", lock_key("tokens"))
        second.standby_interval = 0.05
        task2 = asyncio.create_task(second.run_forever())
        for _ in range(300):
            if {s.name: s for s in await first.status()}["tokens"].lag_events == 0:
                break
            await asyncio.sleep(0.02)
        assert {s.name: s for s in await first.status()}["tokens"].lag_events == 0
        task.cancel()
        task2.cancel()
    finally:
        await holder.close()


async def test_rebuild_builds_beside_and_readers_never_see_a_partial_table(eventlog: EventLog, db):
    await populate(eventlog, tokens=3000)
    runner = runner_for(eventlog, db, batch_size=100)  # many batches: a long rebuild
    for name in runner.projections:
        await runner.catch_up(name)
    before = await snapshot(db.pool)
    seen: list[int] = []
    done = asyncio.Event()

    async def read_while_rebuilding() -> None:
        while not done.is_set():
            seen.append(await db.pool.fetchval("SELECT count(*) FROM live_tokens"))
            await asyncio.sleep(0.005)

    reader = asyncio.create_task(read_while_rebuilding())
    try:
        await runner.rebuild("tokens")
    finally:
        done.set()
        await reader
    assert len(seen) > 5
    assert set(seen) == {len(before["live_tokens"])}  # the old rows, then the same rows
    assert await snapshot(db.pool) == before
    leftovers = await db.pool.fetchval(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'rebuild_%'"
    )
    assert leftovers == 0


async def test_a_second_rebuild_of_the_same_projection_is_refused_not_mixed_in(
    eventlog: EventLog, db
):
    from projections.runner import RebuildInProgress

    await populate(eventlog, tokens=1500)
    first = runner_for(eventlog, db, batch_size=50)
    second = runner_for(eventlog, db)
    await first.ensure_checkpoints()
    async with db.pool.acquire() as holder:
        # The checkpoint row held: the first rebuild builds its copy, then waits at its
        # switch, running for as long as this transaction lasts (not as long as it happens
        # to take).
        held = holder.transaction()
        await held.start()
        await holder.execute(
            "SELECT position FROM projection_checkpoints WHERE name = 'event_stats' FOR UPDATE"
        )
        running = asyncio.create_task(first.rebuild("event_stats"))
        try:
            for _ in range(500):
                shadow = await db.pool.fetchval(
                    "SELECT count(*) FROM pg_namespace WHERE nspname = 'rebuild_event_stats'"
                )
                if shadow:
                    break
                await asyncio.sleep(0.01)
            assert shadow, "the first rebuild never started"
            with pytest.raises(RebuildInProgress):
                # bounded: a second rebuild let through would wait at the held row too
                await asyncio.wait_for(second.rebuild("event_stats"), 30)
            assert not running.done()
        finally:
            await held.rollback()
            await running
    head = await eventlog.head()
    counted = await db.pool.fetchval("SELECT sum(count) FROM event_stats")
    assert counted == head  # every event counted once: no half of another run mixed in


async def test_under_a_stream_of_appends_a_step_carries_many_events(eventlog: EventLog, db):
    """After a step that applied something the runner lingers, so that under load each
    transaction carries a batch rather than an event or two; a quiet log's first event is
    still applied at once."""
    await populate(eventlog, tokens=10)
    runner = ProjectionRunner(
        eventlog, db.pool, db.dsn, [p for p in sql_projections() if p.name == "tokens"],
        linger=0.5,
    )  # fmt: skip
    steps: list[int] = []
    write = runner._write

    async def counted(projection, position, new_position, batch):
        steps.append(len(batch))
        await write(projection, position, new_position, batch)

    runner._write = counted  # type: ignore[method-assign]
    task = asyncio.create_task(runner.run_forever())
    try:

        async def caught_up() -> None:
            for _ in range(500):
                if all(s.lag_events == 0 for s in await runner.status()):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the projection did not catch up")

        await caught_up()
        await asyncio.sleep(0.6)  # past the linger after that batch: the log is quiet
        app = application("co0", 0)
        # A quiet log: one event is applied long before the linger would have passed.
        steps.clear()
        started = asyncio.get_running_loop().time()
        await eventlog.append("token-first", 0, [token(app, 20_000)])
        await caught_up()
        assert asyncio.get_running_loop().time() - started < 0.4 and steps == [1]
        await asyncio.sleep(0.6)  # past the linger
        steps.clear()
        for n in range(60):  # one commit at a time, for about half a second
            tok = token(app, 30_000 + n)
            await eventlog.append(f"token-{tok.family_id}", 0, [tok])
            await asyncio.sleep(0.008)
        await caught_up()
    finally:
        task.cancel()
    assert sum(steps) == 60
    assert len(steps) <= 12, steps  # a step each linger, not one per commit


async def test_a_revoked_family_is_found_by_its_index_a_lone_token_by_its_key(
    eventlog: EventLog, db
):
    """Families of several tokens are indexed by `live_tokens_family_shared` (a hash index),
    which replaces the btree and the full hash index of earlier versions, also in a
    database made with them. A client_credentials token is a family of its own (`fam_` and
    its hash): it has no entry there, and its revocation finds its row by the primary key.
    Revoking both kinds in one batch deletes exactly their rows."""
    async with db.pool.acquire() as conn:
        await conn.execute(
            "DROP INDEX live_tokens_family_shared; "
            "CREATE INDEX live_tokens_family ON live_tokens (family_id); "
            "CREATE INDEX live_tokens_family_hash ON live_tokens USING hash (family_id)"
        )
        await conn.execute("DELETE FROM schema_applied")
        await apply_schema(conn)
    indexes = dict(
        await db.pool.fetch(
            "SELECT indexname, indexdef FROM pg_indexes "
            "WHERE tablename = 'live_tokens' AND indexdef LIKE '%(family_id)%'"
        )
    )
    assert list(indexes) == ["live_tokens_family_shared"]
    assert "USING hash" in indexes["live_tokens_family_shared"]

    app = application("co", 0)
    await eventlog.append(f"application-{app.client_id}", 0, [app])
    lone = [
        replace(token(app, n), family_id=lone_family(token(app, n).token_hash)) for n in range(4)
    ]
    shared = [replace(token(app, n), family_id="fam-shared") for n in (10, 11)]
    other = token(app, 12)
    for n, issued in enumerate([*lone, *shared, other]):
        await eventlog.append(f"token-{n}", 0, [issued])
    runner = runner_for(eventlog, db)
    await runner.catch_up("tokens")
    assert await db.pool.fetchval("SELECT count(*) FROM live_tokens") == 7
    indexed = await db.pool.fetch(
        "SELECT family_id FROM live_tokens "
        "WHERE family_id <> 'fam_' || encode(token_hash, 'hex') ORDER BY family_id"
    )
    assert [r[0] for r in indexed] == [other.family_id, "fam-shared", "fam-shared"]
    families = [lone[1].family_id, "fam-shared"]
    async with db.pool.acquire() as conn:
        await conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                f"EXPLAIN {_DELETE_FAMILIES}", families, [bytes.fromhex(lone[1].token_hash)]
            )
        )
    assert "live_tokens_family_shared" in plan and "live_tokens_pkey" in plan, plan

    revocations = [
        ev.TokenRevoked(
            company_id=app.company_id, client_id=app.client_id, family_id=f, reason="client_request"
        )
        for f in families
    ]
    await eventlog.append("revocations", 0, revocations)
    await runner.catch_up("tokens")
    left = await db.pool.fetch("SELECT encode(token_hash, 'hex') FROM live_tokens")
    assert sorted(r[0] for r in left) == sorted(
        t.token_hash for t in [lone[0], lone[2], lone[3], other]
    )


async def test_token_rows_are_written_as_issued_packed_or_as_arrays(eventlog: EventLog, db):
    """`live_tokens` rows go packed, each column as one text, unless a text would not split
    back (a client id holding the separator): then as arrays. Either way every column is
    as the event gave it: permissions with awkward text and in order, no expiry or one."""
    awkward = 'q"uote\\back é 漢字'
    app = application("co", 0)
    odd = replace(application("co", 1), client_id=f"co-app{SEPARATOR}1")
    issued = [
        replace(token(app, 1), permissions=[awkward, "b:read", "a:read"]),
        token(app, 2, expires_in=3600),
        replace(token(odd, 3), permissions=[]),
    ]
    runner = runner_for(eventlog, db)
    for n, event in enumerate(issued):
        await eventlog.append(f"token-{n}", 0, [event])
        if n in (1, 2):  # the first two in one batch (packed), the odd one alone (arrays)
            await runner.catch_up("tokens")
    rows = await db.pool.fetch(
        "SELECT token_hash, family_id, client_id, company_id, grant_type, permissions, "
        "issued_at, expires_at FROM live_tokens"
    )
    written = {
        (
            r["token_hash"].hex(),
            r["family_id"],
            r["client_id"],
            r["company_id"],
            r["grant_type"],
            tuple(r["permissions"]),
            int(r["issued_at"].timestamp()),
            None if r["expires_at"] is None else int(r["expires_at"].timestamp()),
        )
        for r in rows
    }
    assert written == {
        (e.token_hash, e.family_id, e.client_id, e.company_id, e.grant_type,
         tuple(e.permissions), e.issued_at, e.expires_at)
        for e in issued
    }  # fmt: skip


async def test_a_rebuild_whose_reader_goes_away_rebuilds_everything_all_the_same(
    eventlog: EventLog, db
):
    """`tollgate projections rebuild | head -c1`: the closed pipe silences the output, not
    the rebuild (it said `database: Broken pipe` and left the other projections as they
    were)."""
    await populate(eventlog, tokens=50)
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line
    try:
        rebuild = tollgate(db, "projections", "rebuild", stdout=write)
    finally:
        os.close(write)
    _out, err = rebuild.communicate(timeout=120)
    assert rebuild.returncode == 0, err
    checkpoints = await db.pool.fetch("SELECT name, position FROM projection_checkpoints")
    head = await eventlog.head()
    assert checkpoints and all(r["position"] == head for r in checkpoints), checkpoints


@pytest.mark.parametrize(
    "signals",
    [
        [signal.SIGTERM],
        [signal.SIGHUP],
        [signal.SIGINT],
        [signal.SIGTERM, signal.SIGTERM],  # a second, as the first one's clean-up runs
        [signal.SIGINT, signal.SIGTERM],  # Ctrl-C, then `serve --workers`' parent forwarding
    ],
    ids=["SIGTERM", "SIGHUP", "SIGINT", "SIGTERM-twice", "SIGINT-then-SIGTERM"],
)
async def test_projections_run_stops_on_a_signal_with_its_last_lines_logged(db, signals):
    """`serve --workers` and supervisors stop it with SIGTERM, a terminal with SIGINT: it
    stops as `serve` does, its work cancelled, its sessions closed, its line logged and
    every line still one JSON object (Python's default ended it at once, and the log with
    it); a second signal does not cut that short."""
    worker = await _projections_process(db)
    assert worker.stderr is not None
    said = await _until_started(worker)
    async with _reaped(worker):
        for signum in signals:
            worker.send_signal(signum)
            await asyncio.sleep(0.005)
        rest, code = await _to_its_end(worker)
    said += rest
    events = [msgspec.json.decode(line) for line in said.decode().splitlines()]
    assert code == 0, events[-20:]
    [stopping] = [e for e in events if e["event"] == "projections.stopping"]
    assert stopping["signal"] == signals[0].name
    assert not [e for e in events if e["level"] in ("error", "critical")], events[-20:]


async def test_a_second_signal_at_any_moment_of_the_stop_changes_nothing(db):
    """Closing the event loop gave the stop signals their defaults back, and a second
    SIGTERM in the moments before the interpreter exited ended a process that had stopped
    cleanly with -15 (seen at 30-60 ms)."""
    for delay in (0.0, 0.01, 0.03, 0.05, 0.08, 0.15):
        worker = await _projections_process(db)
        await _until_started(worker)
        async with _reaped(worker):
            worker.send_signal(signal.SIGTERM)
            await asyncio.sleep(delay)
            with contextlib.suppress(ProcessLookupError):  # gone already: nothing to cut
                worker.send_signal(signal.SIGTERM)
            _rest, code = await _to_its_end(worker)
            assert code == 0, delay


async def test_until_caught_up_stopped_short_says_so(db):
    """`--until-caught-up` exits 0 once the projections have caught up: stopped by a
    signal before (here while the database does not answer), it exits 128 + the signal,
    as Python's default would have said."""
    hold: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hold.append(writer)  # accepted, never answered

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    env = {**os.environ, "DATABASE_URL": f"postgresql://tollgate@127.0.0.1:{port}/x",
           "LOG_FORMAT": "json", "DB_TIMEOUT": "30"}  # fmt: skip
    try:
        for flags, code in (("--until-caught-up",), 128 + signal.SIGTERM), ((), 0):
            worker = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service", "projections", "run", *flags,
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            async with _reaped(worker):
                await asyncio.sleep(1.5)  # opening its pool on a database that never answers
                worker.send_signal(signal.SIGTERM)
                said, stopped = await _to_its_end(worker)
            assert stopped == code, said.decode()[-2000:]
            assert b"projections.stopping" in said
    finally:
        server.close()
        for writer in hold:
            writer.close()


async def test_projections_run_under_nohup_outlives_its_terminal(db):
    """Started with SIGHUP ignored (`nohup`, a supervisor), it keeps running on a hang-up,
    as before it handled SIGHUP; SIGTERM still stops it."""
    worker = await _projections_process(
        db, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)
    )
    assert worker.stderr is not None
    said = await _until_started(worker)
    async with _reaped(worker):
        worker.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.0)
        assert worker.returncode is None
        worker.send_signal(signal.SIGTERM)
        rest, code = await _to_its_end(worker)
    said += rest
    assert code == 0
    assert b'"signal":"SIGTERM"' in said


async def _projections_process(db, **kwargs) -> asyncio.subprocess.Process:
    env = {**os.environ, "DATABASE_URL": db.dsn, "LOG_FORMAT": "json"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "projections", "run",
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs,
    )  # fmt: skip


async def _until_started(worker: asyncio.subprocess.Process) -> bytes:
    """Its lines until every projection has started (so its handlers are in place)."""
    assert worker.stderr is not None
    said = b""
    async with asyncio.timeout(30):
        while said.count(b"projection.started") < len(sql_projections()):
            line = await worker.stderr.readline()
            assert line, said.decode()[-2000:]
            said += line
    return said


@contextlib.asynccontextmanager
async def _reaped(worker: asyncio.subprocess.Process) -> AsyncIterator[None]:
    """Killed on the way out if it is still there (a test that failed midway)."""
    try:
        yield
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


async def _to_its_end(worker: asyncio.subprocess.Process) -> tuple[bytes, int]:
    """The rest of its stderr and its exit status, within 15 s."""
    assert worker.stderr is not None
    async with asyncio.timeout(15):
        said = await worker.stderr.read()
        return said, await worker.wait()


async def _cut_and_write_again(eventlog: EventLog, db, after: int, count: int) -> None:
    """The log's tail deleted, as a superuser (or a restore under running processes) could,
    then written again by the service: an intact chain, other events at the same positions."""
    await cut_tail(db.pool, after)
    await companies(eventlog, "again", count)


async def test_a_projection_stops_at_a_log_cut_and_written_again_until_rebuilt(
    eventlog: EventLog, db
):
    """Before, a projection whose checkpoint lay in a tail that was cut and written again
    went on from it: the events written again at or below it were never applied, and
    nothing said so. Its checkpoint saw another event there: it stops, and says why."""
    await populate(eventlog, tokens=30)
    runner = runner_for(eventlog, db)
    at = await runner.catch_up("applications")
    await db.pool.execute("INSERT INTO projection_checkpoints (name) VALUES ('notifier')")
    await db.pool.execute(
        "UPDATE projection_checkpoints SET position = $1 WHERE name = 'notifier'", at
    )
    await _cut_and_write_again(eventlog, db, at - 5, 10)
    [status] = await runner.status(["applications"])
    assert status.rewritten and status.position == at
    with pytest.raises(asyncpg.DataCorruptedError, match=f"rewritten at or before position {at}"):
        await runner.catch_up("applications")
    assert await runner.checkpoint("applications") == at

    rebuild = tollgate(db, "projections", "rebuild")
    out, err = rebuild.communicate(timeout=60)
    assert rebuild.returncode == 0, err
    head = await eventlog.head()
    lines = [msgspec.json.decode(line) for line in out.splitlines()]
    assert {"name": "applications", "rebuilt_to": head} in lines
    assert lines[-1] == {"name": "notifier", "restarted_from": 0}  # it reads the log again
    [status] = await runner.status(["applications"])
    assert not status.rewritten and status.position == head
    await eventlog.append("company-after", 0, [ev.CompanyCreated(company_id="after", name="A")])
    assert await runner.catch_up("applications") == head + 1  # it follows the log again


async def test_the_checkpoint_of_an_intact_log_moves_and_records_what_it_saw(
    eventlog: EventLog, db
):
    await populate(eventlog, tokens=10)
    runner = runner_for(eventlog, db, batch_size=7)
    position = await runner.catch_up("tokens")
    saw = await db.pool.fetchval(
        "SELECT position_hash FROM projection_checkpoints WHERE name = 'tokens'"
    )
    assert saw == await db.pool.fetchval("SELECT hash FROM events WHERE position = $1", position)
    [status] = await runner.status(["tokens"])
    assert not status.rewritten
