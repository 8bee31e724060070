"""Snapshots of the in-memory models in PostgreSQL: one process at a time writes them, and a
start takes the newest one that belongs to this log and this version of the code, then
reads only the log after it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import asyncpg
import pytest

from projections import snapshots
from projections.directory import DirectoryModel
from projections.feed import MemoryFeed
from projections.memory import PolicyModel
from service.eventlog import EventLog
from tests.factories import application, populate, token
from tests.integration.test_memory_feed import counting_reads
from tests.unit.test_model_snapshots import held


def writer(eventlog: EventLog, db, min_events: int = 1) -> snapshots.SnapshotWriter:
    return snapshots.SnapshotWriter(eventlog, db.pool, db.dsn, every=3600, min_events=min_events)


async def more_tokens(eventlog: EventLog, n: int, tag: int = 9) -> None:
    app = application(f"late{tag}", 1)
    await eventlog.append(f"application-{app.client_id}", 0, [app])
    for k in range(n):
        tok = token(app, k, expires_in=3600)
        await eventlog.append(f"token-{tok.family_id}", 0, [tok])


async def until_one_is_written(db, seconds: float) -> None:
    """Until `model_snapshots` holds a row, or `seconds` have passed."""
    for _ in range(int(seconds / 0.01)):
        if await db.pool.fetchval("SELECT count(*) FROM model_snapshots"):
            return
        await asyncio.sleep(0.01)


async def caught_up(eventlog: EventLog, policy: PolicyModel, directory: DirectoryModel) -> list:
    await MemoryFeed(eventlog, [policy, directory]).catch_up()
    now = time.time()
    policy.sweep(now)  # as the writer does before it writes, and every process as it follows
    policy.compact(now)
    return held(policy, directory)


async def test_a_start_reads_only_the_log_after_the_newest_snapshot(eventlog, db, monkeypatch):
    await populate(eventlog, 300)
    written = await writer(eventlog, db).write_once()
    assert written == await eventlog.head()
    await more_tokens(eventlog, 25)

    restored = await snapshots.load(db.pool)
    assert restored is not None and restored.position == written
    reads = counting_reads(eventlog, monkeypatch)
    from_snapshot = await caught_up(eventlog, restored.policy, restored.directory)
    assert min(reads) == written  # nothing before the snapshot was read again
    monkeypatch.undo()
    assert from_snapshot == await caught_up(eventlog, PolicyModel(), DirectoryModel())
    assert restored.policy.position == await eventlog.head()


@pytest.mark.parametrize(
    "spoil",
    [
        "UPDATE model_snapshots SET event_hash = '\\x00'",  # not this log (a restored backup)
        "UPDATE model_snapshots SET format = 'another version'",
        "DELETE FROM model_snapshots WHERE part = (SELECT max(part) FROM model_snapshots)",
        "UPDATE model_snapshots SET data = '\\x00' WHERE part = 0",
        "UPDATE model_snapshots SET parts = 0",
    ],
    ids=["other-log", "other-format", "incomplete", "undecodable", "no-parts"],
)
async def test_a_snapshot_that_cannot_be_used_leaves_the_start_to_the_log(
    eventlog, db, monkeypatch, spoil
):
    monkeypatch.setattr(snapshots, "PART_ITEMS", 50)  # several parts
    await populate(eventlog, 300)
    assert await writer(eventlog, db).write_once() is not None
    assert await snapshots.load(db.pool) is not None
    await db.pool.execute(spoil)
    assert await snapshots.load(db.pool) is None
    policy, directory = await snapshots.models(db.pool)
    assert policy.position == directory.position == 0 and not policy.tokens


async def test_one_process_at_a_time_writes_them(eventlog, db):
    await populate(eventlog, 50)
    holder = await asyncpg.connect(db.dsn)
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", snapshots.LOCK_KEY)
        assert await writer(eventlog, db).write_once() is None
        assert await db.pool.fetchval("SELECT count(*) FROM model_snapshots") == 0
    finally:
        await holder.close()
    assert await writer(eventlog, db).write_once() is not None


async def test_a_snapshot_is_written_once_the_log_has_grown_and_replaces_the_older(eventlog, db):
    await populate(eventlog, 50)
    if (head := await eventlog.head()) < 100:
        await more_tokens(eventlog, 100 - head, tag=1)
    often = writer(eventlog, db, min_events=100)
    first = await often.write_once()
    assert first == await eventlog.head()
    assert await often.write_once() is None  # nothing new
    await more_tokens(eventlog, 60, tag=2)
    assert await often.write_once() is None  # 61 events: not enough
    await more_tokens(eventlog, 60, tag=3)
    second = await often.write_once()
    assert second == await eventlog.head() > first
    positions = await db.pool.fetch("SELECT DISTINCT position FROM model_snapshots")
    assert [r["position"] for r in positions] == [second]
    restored = await snapshots.load(db.pool)
    assert restored is not None and restored.position == second
    assert held(restored.policy, restored.directory) == await caught_up(
        eventlog, PolicyModel(), DirectoryModel()
    )


async def test_the_writer_runs_beside_the_projections_and_survives_a_failure(eventlog, db):
    await populate(eventlog, 50)
    broken = writer(eventlog, db)
    broken.every = 0.01
    calls: list[int] = []

    async def failing() -> int | None:
        calls.append(1)
        if len(calls) == 1:
            raise asyncpg.PostgresConnectionError("the database went away")
        return await snapshots.SnapshotWriter.write_once(broken)

    broken.write_once = failing  # type: ignore[method-assign]
    task = asyncio.create_task(broken.run_forever())
    try:
        await until_one_is_written(db, 5)
    finally:
        task.cancel()
    assert len(calls) >= 2
    assert await snapshots.load(db.pool) is not None


async def test_the_projections_process_writes_them(eventlog, db):
    """`tollgate projections run`, as `serve --workers` starts it, writes a snapshot within
    MODEL_SNAPSHOT_EVERY once the log has grown by 10,000 events."""
    head = await populate(eventlog, 10_000, chunk=2000)
    assert head >= 10_000
    env = {**os.environ, "DATABASE_URL": db.dsn, "LOG_FORMAT": "json", "MODEL_SNAPSHOT_EVERY": "1"}
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "projections", "run",
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    said = b""
    try:
        # Its line, not only its row: the row is visible to others a moment before the
        # process logs it, and a stop in between lost the line (seen in CI).
        async with asyncio.timeout(30):
            assert worker.stderr is not None
            while b"model_snapshot.written" not in said:
                line = await worker.stderr.readline()
                assert line, said.decode()[-2000:]
                said += line
    finally:
        worker.terminate()
        await worker.wait()
    restored = await snapshots.load(db.pool)
    assert restored is not None and restored.position == head, said.decode()[-2000:]
