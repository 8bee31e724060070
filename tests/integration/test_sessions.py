"""A session that stops answering is given up and replaced (`SessionWatch`).

A connection whose server side is gone, or frozen, looks open to its client: nothing
arrives to say otherwise. Here the listener's backend is stopped (SIGSTOP), as a session
the server dropped during a network cut looks to its client once the network is back:
open, and silent for ever. (tests/faults/test_partition.py cuts a real network.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import structlog

from projections.catalog import sql_projections
from projections.runner import ProjectionRunner, lock_key
from service import events as ev
from service.eventlog import EventLog
from service.storage.database import SESSION_CHECK
from tests.factories import application
from tests.urls import with_short_drop


async def listening(eventlog: EventLog, *, other_than: int | None = None) -> int:
    """Until `eventlog` listens on a session (not `other_than`); that session's backend."""
    deadline = time.monotonic() + 3 * SESSION_CHECK + 10
    while True:
        listener = eventlog._listener
        if listener is not None and "tollgate_events" in listener._listeners:
            pid = listener.get_server_pid()
            if pid != other_than:
                return pid
        assert time.monotonic() < deadline, "no listening session"
        await asyncio.sleep(0.05)


async def woken_within(eventlog: EventLog, writer: EventLog, n: int) -> float:
    """How long until `eventlog` hears of an append by `writer` (at most 5 s)."""
    head = eventlog.wakeup.head
    started = time.monotonic()
    waiting = asyncio.ensure_future(eventlog.wakeup.wait(head, 5.0))
    await writer.append(f"woken-{n}", 0, [ev.CompanyCreated(company_id=f"c{n}", name="C")])
    await waiting
    return time.monotonic() - started


async def test_a_listener_whose_session_stops_answering_listens_again(db):
    eventlog = EventLog(db.pool, db.dsn, poll_interval=0.5)
    writer = EventLog(db.pool)
    await eventlog.start()
    await writer.start()
    stopped = await listening(eventlog)
    try:
        assert await woken_within(eventlog, writer, 1) < 2.0
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        # Without the check the listener waits on the stopped session for ever: no
        # notification arrives, and nothing tells it that none will.
        replaced = await listening(eventlog, other_than=stopped)
        took = time.monotonic() - started
        assert took < 2 * SESSION_CHECK + 3, took
        assert await woken_within(eventlog, writer, 2) < 2.0
    finally:
        os.kill(stopped, signal.SIGCONT)
        await eventlog.close()
        await writer.close()
    assert replaced != stopped


async def lock_holder_pid(db, name: str) -> int:
    """The backend that holds projection `name`'s lock (waits for one)."""
    deadline = time.monotonic() + 10
    while True:
        pid = await db.pool.fetchval(
            """SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND objsubid = 1 AND (classid::bigint << 32 | objid::bigint) = $1""",
            lock_key(name),
        )
        if pid is not None:
            return int(pid)
        assert time.monotonic() < deadline, f"nobody took {name}'s lock"
        await asyncio.sleep(0.05)


async def lags(runner: ProjectionRunner) -> dict[str, int]:
    return {s.name: s.lag_events for s in await runner.status()}


async def caught_up(runner: ProjectionRunner, name: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (await lags(runner))[name]:
        assert time.monotonic() < deadline, f"{name} never caught up"
        await asyncio.sleep(0.05)


async def test_a_projection_whose_lock_session_stops_answering_stops_until_it_is_gone(
    eventlog: EventLog, db
):
    """Its lock may be about to go to another process (the server drops a silent client
    after PEER_TIMEOUTS): the runner stops applying within 2 x SESSION_CHECK, although the
    pool it applies through answers, and takes the projection again once the session is
    gone. Without the check it goes on applying (and, its lock freed, beside another)."""
    runner = ProjectionRunner(eventlog, db.pool, db.dsn, sql_projections(), standby_interval=0.2)
    n = 0

    async def appended(count: int) -> None:
        nonlocal n
        for _ in range(count):
            n += 1
            await eventlog.append(f"application-cs-app{n}", 0, [application("cs", n)])

    task = asyncio.create_task(runner.run_forever())
    frozen = None
    try:
        frozen = await lock_holder_pid(db, "event_stats")
        await appended(3)
        await caught_up(runner, "event_stats", 10)
        os.kill(frozen, signal.SIGSTOP)
        await asyncio.sleep(2 * SESSION_CHECK + 1)  # stopped by now
        await appended(3)
        await caught_up(runner, "applications", 10)  # the pool answers
        await asyncio.sleep(2)  # a running projection applies these in milliseconds
        assert (await lags(runner))["event_stats"] == 3
        os.kill(frozen, signal.SIGCONT)  # the backend finds its client gone and ends
        frozen = None
        await caught_up(runner, "event_stats", 15)
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_projection_runner_warns_of_a_url_that_lets_the_server_drop_it_too_soon(
    eventlog: EventLog, db
):
    """Once, as it starts: the server could free its locks before a cut-off host stops."""
    short = with_short_drop(db.dsn)
    runner = ProjectionRunner(eventlog, db.pool, short, sql_projections(), standby_interval=0.2)
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(runner.run_forever())
        try:
            await caught_up(runner, "event_stats", 10)  # it ran, on that URL's sessions
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    warned = [e for e in logs if e["event"] == "database.peer_timeouts_short"]
    assert [e["dropped_after_s"] for e in warned] == [10.0]
