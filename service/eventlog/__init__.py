"""The PostgreSQL event log: append with optimistic concurrency, read, subscribe.

Why no reader ever skips an event
---------------------------------
A log ordered by a sequence has a classic gap problem: writer A takes position 10,
writer B takes 11 and commits first; a reader that sees 11 and moves its checkpoint past
10 never sees A's event. Tollgate closes it by serialising appends: each append
transaction first takes the writers' lock (`LOCK TABLE events_writer IN EXCLUSIVE MODE`,
in `events_append_batch`, schema.sql), which conflicts with itself but not with readers.
Positions are handed out under that lock and the lock is held until commit, after the commit has
become visible, so positions are dense and follow commit order, and every snapshot sees a
prefix of the log. This is the design of eventsourcing's `_lock_table`, with the lock on
a table of its own that is never written: `events` itself in EXCLUSIVE mode also
conflicts with the SHARE UPDATE EXCLUSIVE lock of VACUUM and ANALYZE, so every autovacuum
of the log held all appends for as long as it ran (300 ms for an ANALYZE of 200,000
events), and an anti-wraparound vacuum, which is not cancelled, would hold them for the
whole table. The alternative, `xid8` visibility checks, keeps concurrent writers but
needs an (xid, position) checkpoint in every reader and a sealer for a dense hash chain.

Serialising writers would cap throughput at one commit (one WAL flush) at a time, so
appends are *group committed*: a single writer task per process takes every append waiting
in its queue and writes them in one statement, one multi-row INSERT and one WAL flush.
Each append is still checked on its own (a stale expected version fails that append
alone), and its future resolves only after the commit.

The lock is held for that one statement (`events_append_batch`) and its commit, never
across a round trip to a process: the statement checks the versions, hands out positions
and versions and chains the hashes itself, reading the head of the chain under the lock
(the writer sends each event's digest, so that it hashes a few bytes an event). No
writer needs to know the head, so writers in several processes interleave their batches
without a second round trip, and none holds the lock while its event loop is busy.

Readers wake on LISTEN/NOTIFY; a notification is only a hint, and polling covers a lost
one or a dropped listener connection. A batch small enough for a notification also travels
in one of its own (`tollgate_batches`), in commit order like every notification, so that a
process keeping the log in memory applies another's commit without reading it back. Any
session of the database may send a notification, so an announced batch is believed only
from a backend whose role may append to `events` (which could write those events anyway);
one not yet checked is read, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
import structlog
from asyncpg.pool import PoolConnectionProxy

from service.eventlog.appends import Append, Plan, settle
from service.eventlog.records import (
    EPOCH,
    NO_METADATA,
    ConcurrencyError,
    EventLogError,
    EventLogRefused,
    EventLogUnavailable,
    Metadata,
    RecordedEvent,
    lean_recorded,
    to_recorded,
)
from service.events import Event, decode_or_unknown
from service.logs import error_text
from service.storage.database import (
    CLOSE_TIMEOUT,
    SESSION_CHECK,
    BoundedPool,
    SessionLost,
    SessionWatch,
    connect,
    while_session_answers,
    within,
)

__all__ = [
    "EPOCH",
    "NO_METADATA",
    "Announced",
    "Appended",
    "ConcurrencyError",
    "EventLog",
    "EventLogError",
    "EventLogRefused",
    "EventLogUnavailable",
    "Metadata",
    "RecordedEvent",
    "Wakeup",
    "decode_lean",
    "to_recorded",
]

log = structlog.get_logger(__name__)

CHANNEL = "tollgate_events"
#: commits announced with their events (schema.sql, `events_append_batch`)
BATCHES = "tollgate_batches"

_COLUMNS = (
    "position, stream_id, version, type, schema_version, company_id, payload, metadata, "
    "recorded_at, hash"
)
_LEAN_QUERY = """
SELECT '[' || coalesce(string_agg(concat('[', position, ',', version, ',', to_json(type), ',',
                                        schema_version, ',', payload::text, ']'),
                                 ',' ORDER BY position), '') || ']'
FROM (SELECT position, version, type, schema_version, payload FROM events
      WHERE {where} ORDER BY position LIMIT $2) AS batch
"""
_lean_decoder = msgspec.json.Decoder(list[tuple[int, int, str, int, msgspec.Raw]])
#: how long a backend found allowed to append is believed as the sender of announced
#: batches before it is checked again (its pid could in time be another session's)
SENDER_TRUST = 60.0
#: the log's head (positions are dense and follow commit order)
_HEAD = "SELECT coalesce(max(position), 0) FROM events"
#: the writer connection's session: its pid, and when it started (a pid alone could in time
#: be another session's)
_SESSION = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
#: ends that session, if it is still there, and waits for it (PostgreSQL 14 and later)
_END_SESSION = (
    "SELECT pg_terminate_backend(pid, $3) FROM pg_stat_activity "
    "WHERE pid = $1 AND backend_start = $2"
)
#: how long a session whose batch's answer was lost is waited for, once told to end
BACKEND_EXIT_MS = 2000
_MAY_APPEND = (
    "SELECT has_table_privilege(usesysid, 'events', 'INSERT') FROM pg_stat_activity WHERE pid = $1"
)


def decode_lean(text: str | bytes) -> list[RecordedEvent]:
    """A lean read's batch (or an announced one), one msgspec call for the whole array."""
    return [
        lean_recorded(p, v, t, sv, decode_or_unknown(t, sv, raw))
        for p, v, t, sv, raw in _lean_decoder.decode(text)
    ]


_DB_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    asyncio.TimeoutError,
)


def _ambiguous(exc: BaseException) -> bool:
    """The connection failed, rather than the server refusing the statement (which rolls
    it back): a commit sent may or may not have happened."""
    if isinstance(exc, asyncpg.PostgresError):
        return isinstance(exc, asyncpg.PostgresConnectionError)
    return isinstance(exc, _DB_ERRORS)


def failure(exc: BaseException) -> EventLogError:
    """What a database error means to the caller: a value it refused (class 22, data
    exception: a NUL character in text, say) is the request's fault and will not go away;
    anything else is the database being unavailable."""
    if isinstance(exc, asyncpg.DataError):
        return EventLogRefused(str(exc))
    return EventLogUnavailable(str(exc))


def _wake(waiter: asyncio.Future[None], _settled: object = None) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _outcome_unread(future: asyncio.Future[list[int]]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: asyncio would log it as lost otherwise


class Wakeup:
    """Broadcasts "the log has grown to position N" to every waiting reader in a process."""

    def __init__(self) -> None:
        self.head = 0
        self._future: asyncio.Future[None] | None = None

    def notify(self, position: int) -> None:
        self.head = max(self.head, position)
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self, after: int, patience: float) -> None:
        if self.head > after:
            return
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
        # that arrives in the loop turn the future completes, and a reader's task that a
        # notify woke at the moment it was stopped would then follow the log for ever
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                await asyncio.shield(self._future)

    async def between_runs(self, before: int, after: int, patience: float, linger: float) -> None:
        """The pause of a follower of the log between two runs, which took it from `before`
        to `after`: one that moved nothing waits for a commit past `after` (at most
        `patience`); one that moved waits `linger` first, so that under load a run carries
        many commits instead of one, and the first after a quiet spell runs at once."""
        if after == before:
            await self.wait(after, patience)
        elif linger:
            await asyncio.sleep(linger)


#: (positions, expected version, events) of an append just committed
Appended = Callable[[Sequence[int], int | None, Sequence[Event]], object]
#: (first position, last position, the events as a lean read's JSON) of a batch that a
#: writer announced on committing it (decode with `decode_lean`)
Announced = Callable[[int, int, str], object]


class EventLog:
    def __init__(
        self,
        pool: asyncpg.Pool,
        dsn: str | None = None,
        *,
        max_batch_events: int = 2000,
        poll_interval: float = 1.0,
        on_commit: Callable[[int], None] | None = None,
        timeout: float | None = None,
        announcements: bool = True,
        session_check: float = SESSION_CHECK,
    ) -> None:
        self._pool = pool
        #: seconds between the listener's round trips (SessionWatch)
        self._session_check = session_check
        #: whether the listener hears the batches commits announce with their events (for
        #: `announced`, a process that keeps the log in memory), or only the head: each
        #: batch is a notification the server copies to every session listening for it
        self._announcements = announcements
        #: how long an append waits to be committed (default: the pool's bound, if any)
        self.timeout = timeout
        if timeout is None and isinstance(pool, BoundedPool):
            self.timeout = pool.timeout
        self._dsn = dsn
        self._max_batch_events = max_batch_events
        self.poll_interval = poll_interval
        self.wakeup = Wakeup()
        self._pending: deque[Append] = deque()
        self._idle: asyncio.Future[None] | None = None  # set while the writer waits for work
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: asyncpg.Connection | None = None
        self._conn: PoolConnectionProxy[asyncpg.Record] | None = None
        #: committed transactions and the appends they carried (group commit at work)
        self.batches_committed = 0
        self.appends_committed = 0
        #: called with each committed batch's size (metrics)
        self.on_commit = on_commit
        #: called with each committed append's positions, expected version and events, in
        #: position order, before its caller or any reader hears of it (MemoryFeed.apply_own)
        self.appended: list[Appended] = []
        #: called with each batch announced by its writer (any process's, this one's too),
        #: in commit order, before readers wake (MemoryFeed.apply_announced)
        self.announced: list[Announced] = []
        #: called with when (view_clock()) each answered round trip on the listener's
        #: session began, and the head notified by then: every commit before that moment
        #: had been notified, its announcement applied (MemoryFeed.heard)
        self.heard: list[Callable[[float, int], object]] = []
        self._senders: dict[int, float] = {}  # backend pid: until when it is believed
        self._checks: dict[int, asyncio.Task[None]] = {}
        self._in_flight: Plan | None = None  # the batch sent to the server, until answered
        self._backend: tuple[int, datetime] | None = None  # the writer connection's session

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._writer(), name="eventlog-writer"))
        if self._dsn is not None:
            self._tasks.append(asyncio.create_task(self._listen(), name="eventlog-listener"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for check in list(self._checks.values()):
            check.cancel()
        while self._pending:  # appends the writer never took: not written
            settle(self._pending.popleft(), EventLogUnavailable("the event log was closed"))
        if self._listener is not None:
            with contextlib.suppress(*_DB_ERRORS):
                await self._listener.close(timeout=CLOSE_TIMEOUT)
            self._listener = None
        if self._conn is not None:
            with contextlib.suppress(*_DB_ERRORS):
                await self._pool.release(self._conn)
            self._conn = None

    # --- writing ---------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        expected_version: int | None,
        events: Sequence[Event],
        metadata: Metadata | None = None,
        *,
        conditions: Sequence[tuple[str, int]] = (),
    ) -> list[int]:
        """Append `events` to `stream_id` and return their positions once committed.

        `expected_version` is the stream's current version (0: a new stream; None: any).
        `conditions` are other streams that must still be at the given versions (a token
        issued against an application's secret fails if the secret was rotated meanwhile).
        Raises ConcurrencyError, with nothing written, when a version does not match.
        """
        if not events:
            raise ValueError("append needs at least one event")
        if not self._tasks:
            raise EventLogError("the event log is not started")
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        request = Append(
            stream_id, expected_version, events, metadata or Metadata(), conditions, future
        )
        self._pending.append(request)
        idle, self._idle = self._idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)
        if self.timeout is None:
            return await future
        return await self._committed_within(request, self.timeout)

    async def _committed_within(self, request: Append, seconds: float) -> list[int]:
        """The append's positions, or EventLogUnavailable once `seconds` have passed (a frozen
        database holds the writer): "not written" while the writer has not taken it, which
        is then withdrawn; once taken, the commit may be on its way and only "may or may not
        be written" is true."""
        future = request.future
        if not future.done():
            # A bare timer and a waiter of our own, rather than asyncio.timeout around a
            # shield: the same bound at a third of the cost, paid on every append. (Not
            # wait_for, which on 3.11 can swallow a cancellation: see Wakeup.wait.)
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            wake = functools.partial(_wake, waiter)
            future.add_done_callback(wake)
            timer = loop.call_later(seconds, wake)
            try:
                await waiter
            finally:
                timer.cancel()
                future.remove_done_callback(wake)
        if future.done():
            return future.result()
        # The writer settles it later; nobody is left to read the outcome.
        request.future.add_done_callback(_outcome_unread)
        if request in self._pending:
            self._pending.remove(request)
            raise EventLogUnavailable(f"the append was not written within {seconds:g} s")
        log.warning("eventlog.append_outcome_unknown", error="timeout", stream_id=request.stream_id)
        raise EventLogUnavailable(
            f"the append was not confirmed within {seconds:g} s; it may or may not be written"
        )

    async def _writer(self) -> None:
        # One batch in flight per process: appends that arrive while it commits form the
        # next batch. Two in flight on two connections (the waiting appends split between
        # them, each chained on the head the other will leave) measured slower on two
        # cores: each commit's fixed cost (round trip, call, WAL flush under the lock) is
        # paid twice as often, and the second batch mostly waits for the lock.
        while True:
            if not self._pending:
                self._idle = asyncio.get_running_loop().create_future()
                await self._idle
            await self._commit_batch(self._drain())

    async def _writer_connection(self) -> PoolConnectionProxy[asyncpg.Record]:
        """The writer keeps one connection: no pool round trip per batch."""
        if self._conn is not None:
            try:
                closed = self._conn.is_closed()
            except asyncpg.InterfaceError:
                closed = True  # it broke, and the pool has taken it back
            if closed:
                await self._drop_connection()
        if self._conn is None:
            conn = await self._pool.acquire()
            try:
                # which session it is: ended, if a batch's answer is lost (`_ended`)
                session = await conn.fetchrow(_SESSION)
                self._backend = None if session is None else (session[0], session[1])
            except BaseException:
                await self._pool.release(conn)
                raise
            self._conn = conn
        return self._conn

    async def _drop_connection(self, *, broken: bool = False) -> None:
        """Gives the writer's connection back to the pool; `broken`: closed first, never to
        be used again (a statement on it failed midway: its session is to be ended, not
        handed to the next query)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if broken:
                with contextlib.suppress(*_DB_ERRORS):
                    conn.terminate()
            with contextlib.suppress(*_DB_ERRORS):
                await self._pool.release(conn)

    def _drain(self) -> list[Append]:
        pending = self._pending
        batch = [pending.popleft()]
        size = len(batch[0].events)
        while pending and size < self._max_batch_events:
            request = pending.popleft()
            batch.append(request)
            size += len(request.events)
        return batch

    async def _commit_batch(self, batch: list[Append]) -> None:
        try:
            await self._commit(batch)
        except asyncio.CancelledError:
            # Closed while the batch was on the server: it may commit all the same.
            why = "append interrupted: the log was closed"
            if self._in_flight is not None:
                why = "the append may or may not be written: the log was closed as it committed"
            for request in batch:
                settle(request, EventLogUnavailable(why))
            raise
        except Exception as exc:
            if not await self._recover(batch, exc):
                return
        self._committed(batch)

    async def _recover(self, batch: list[Append], exc: Exception) -> bool:
        """After a failed batch: True if it committed after all, else each append is
        retried alone or failed. The writer itself never dies of one batch."""
        ambiguous = _ambiguous(exc)
        if ambiguous:
            await self._drop_connection(broken=True)
        plan, self._in_flight = self._in_flight, None
        if ambiguous and plan is not None:
            # The connection failed after the batch was sent: the commit may have happened,
            # or may still happen. Retrying before knowing would write the events twice.
            landed = await self._landed(plan, batch) if await self._ended(plan) else None
            if landed is None:
                log.warning("eventlog.append_outcome_unknown", error=error_text(exc))
                unknown = EventLogUnavailable(f"the append may or may not be written: {exc}")
                for request in batch:
                    settle(request, unknown)
                return False
            if len(landed) == len(batch):
                return True
            if landed:
                # It committed, without the appends whose versions had moved: they are
                # decided again, alone.
                self._committed([r for r in batch if r in landed])
                for request in batch:
                    if request not in landed:
                        await self._commit_batch([request])
                return False
        if len(batch) > 1:
            # One bad append must not fail its neighbours: retry each on its own.
            for request in batch:
                await self._commit_batch([request])
            return False
        log.warning("eventlog.append_failed", error=error_text(exc), stream_id=batch[0].stream_id)
        if isinstance(exc, _DB_ERRORS):
            settle(batch[0], failure(exc))
        else:
            log.exception("eventlog.append_error", stream_id=batch[0].stream_id)
            settle(batch[0], EventLogError(f"the append could not be written: {exc!r}"))
        return False

    async def _ended(self, plan: Plan) -> bool:
        """Whether the session a batch was sent on has ended, so that the log now holds the
        batch or never will. A server notices that its client is gone only when it next
        writes to it: a session still waiting for the writers' lock, or still running the
        batch, commits it after its client has given up on it, and a look at the log before
        then finds nothing and writes the batch a second time. So the session is ended here
        (terminated, and waited for); False: that could not be done (the database out of
        reach, say)."""
        if plan.backend is None:
            return False
        pid, started = plan.backend
        try:
            ended = await self._pool.fetchval(_END_SESSION, pid, started, BACKEND_EXIT_MS)
        except _DB_ERRORS:
            return False
        return ended is not False  # None: no such session any more

    async def _landed(self, plan: Plan, batch: list[Append]) -> list[Append] | None:
        """The appends of `plan` that are in the log, their positions set (None: cannot
        tell). An append is found by its stream, the batch's time (to the microsecond,
        taken by this process), what it wrote and, when it expected one, the version its
        first event has."""
        streams = list(dict.fromkeys(r.stream_id for r in batch))
        try:
            rows = await self._pool.fetch(
                "SELECT stream_id, position, version, payload::text AS payload, "
                "metadata::text AS metadata FROM events "
                "WHERE stream_id = ANY($1) AND recorded_at = $2 ORDER BY position",
                streams,
                plan.recorded_at,
            )
        except _DB_ERRORS:
            return None
        found: dict[str, deque[tuple[int, int, str, str]]] = {}
        for row in rows:
            found.setdefault(row["stream_id"], deque()).append(
                (row["position"], row["version"], row["payload"], row["metadata"])
            )
        # In batch order, as the batch wrote them: an append's rows are the first of its
        # stream's not taken by an append before it.
        landed = []
        #: per stream and what was written: the first versions of the appends found
        twins: dict[tuple[str, str], list[int]] = {}
        for request, written in zip(batch, plan.written, strict=True):
            stored = found.get(request.stream_id, deque())
            mine = list(stored)[: len(written)]
            expected = request.expected_version
            twin = twins.setdefault((request.stream_id, repr(written)), [])
            if [(p, m) for _, _, p, m in mine] == written and (
                expected is None or mine[0][1] == expected + 1  # else another one's rows
            ):
                for _ in written:
                    stored.popleft()
                request.positions, request.error = [position for position, _, _, _ in mine], None
                landed.append(request)
                twin.append(mine[0][1])
            elif any(expected is None or expected + 1 == v for v in twin):
                # An append before it wrote the same rows to the same stream, at a version
                # this one could have written them at: had that one been refused, these
                # rows would be this one's. Which it was, only the lost answer said.
                return None
        return landed

    def _committed(self, batch: list[Append]) -> None:
        self.batches_committed += 1
        self.appends_committed += len(batch)
        if self.on_commit is not None:
            self.on_commit(len(batch))
        for request in batch:
            if request.positions and request.error is None:
                for hook in self.appended:
                    try:
                        hook(request.positions, request.expected_version, request.events)
                    except Exception:
                        # Committed whatever a reader makes of it: never taken for a
                        # failed batch (which would be retried, and written twice).
                        log.exception(
                            "eventlog.appended_hook_failed", position=request.positions[0]
                        )
        for request in batch:
            settle(request)
        last = max((r.positions[-1] for r in batch if r.positions), default=0)
        if last:
            self.wakeup.notify(last)

    async def _commit(self, batch: list[Append]) -> None:
        self._in_flight = None
        conn = await self._writer_connection()
        plan = Plan.build(batch)
        plan.backend = self._backend
        self._in_flight = plan
        try:
            outcome = await conn.fetchval(plan.statement, *plan.args, False)
        except asyncpg.UniqueViolationError:
            # A stream taken to be new exists (nothing was written): every stream is
            # looked up this time, and the append that assumed it fails alone.
            outcome = await conn.fetchval(plan.statement, *plan.args, True)
        plan.apply(batch, outcome)
        self._in_flight = None

    # --- reading ---------------------------------------------------------------------

    async def head(self) -> int:
        try:
            value = await self._pool.fetchval(_HEAD)
        except _DB_ERRORS as exc:
            raise failure(exc) from exc
        return int(value)

    async def read_all(
        self,
        after: int = 0,
        limit: int = 1000,
        *,
        types: Sequence[str] | None = None,
        until: int | None = None,
        lean: bool = False,
    ) -> list[RecordedEvent]:
        """Events after `after` (and at most `until`), in position order, at most `limit`.

        `lean` reads only what in-memory models use (position, version, type and the event);
        stream and tenant come back empty and metadata, time and hash as `NO_METADATA`,
        `EPOCH` and b"". It makes a catch-up markedly faster. An event this version cannot
        read comes back as `UnknownEvent` (models skip it); a full read raises instead.
        """
        clauses = ["position > $1"]
        args: list[Any] = [after, limit]
        if types is not None:
            args.append(list(types))
            clauses.append(f"type = ANY(${len(args)})")
        if until is not None:
            args.append(until)
            clauses.append(f"position <= ${len(args)}")
        where = " AND ".join(clauses)
        if not lean:
            query = f"SELECT {_COLUMNS} FROM events WHERE {where} ORDER BY position LIMIT $2"
            return await self._fetch(query, *args)
        # The whole batch comes back as one JSON text and is decoded by one msgspec call:
        # several times faster than building a Record per row.
        query = _LEAN_QUERY.format(where=where)
        try:
            text = await self._pool.fetchval(query, *args)
        except _DB_ERRORS as exc:
            raise failure(exc) from exc
        return decode_lean(text)

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        query = (
            f"SELECT {_COLUMNS} FROM events WHERE stream_id = $1 AND version > $2 ORDER BY version"
        )
        return await self._fetch(query, stream_id, after_version)

    async def stream_version(self, stream_id: str) -> int:
        try:
            value = await self._pool.fetchval(
                "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = $1", stream_id
            )
        except _DB_ERRORS as exc:
            raise failure(exc) from exc
        return int(value)

    async def _fetch(self, query: str, *args: Any) -> list[RecordedEvent]:
        try:
            rows = await self._pool.fetch(query, *args)
        except _DB_ERRORS as exc:
            raise failure(exc) from exc
        return [to_recorded(row) for row in rows]

    async def subscribe(
        self, after: int = 0, *, batch_size: int = 1000, types: Sequence[str] | None = None
    ) -> AsyncIterator[list[RecordedEvent]]:
        """Yield batches of events after `after`, forever, waking on new appends."""
        position = after
        while True:
            batch = await self.read_all(position, batch_size, types=types)
            if batch:
                position = batch[-1].position
                yield batch
                continue
            await self.wakeup.wait(position, self.poll_interval)

    def _believed(self, pid: int) -> bool:
        """Whether an announcement from backend `pid` may be applied: its role may append
        to the log, as checked within SENDER_TRUST. Not yet known: checked in the
        background, and meanwhile not believed (its batch is read from the table, a round
        trip later). A sender still believed is checked again once half its trust has
        gone, so that a writer that keeps announcing is never in that gap."""
        now = time.monotonic()
        until = self._senders.get(pid, 0.0)
        if until > now:
            if until - now < SENDER_TRUST / 2:
                self._check_again(pid)
            return True
        if len(self._senders) > 1024:  # writers come and go with their processes
            self._senders = {p: until for p, until in self._senders.items() if until > now}
        self._check_again(pid)
        return False

    def _check_again(self, pid: int) -> None:
        if pid not in self._checks:
            check = asyncio.ensure_future(self._check_sender(pid))
            self._checks[pid] = check
            check.add_done_callback(lambda _task: self._checks.pop(pid, None))

    async def _check_sender(self, pid: int) -> None:
        try:
            allowed = await self._pool.fetchval(_MAY_APPEND, pid)
        except _DB_ERRORS as exc:
            log.warning("eventlog.sender_check_failed", sender=pid, error=error_text(exc))
            return
        if allowed:
            self._senders[pid] = time.monotonic() + SENDER_TRUST
        elif allowed is not None:  # gone already: nothing to say
            log.warning("eventlog.announcement_refused", sender=pid,
                        reason="the sending session may not append to the log")  # fmt: skip

    def _heard(self, began: float) -> None:
        """The listener's session answered a round trip that began at `began`. The server
        sends a listening session the notifications it has before it says it is ready
        for the next query, and each was applied as it came (its callbacks ran before
        this answer's): every commit before `began` is at or below the head now."""
        head = self.wakeup.head
        for hook in self.heard:
            try:
                hook(began, head)
            except Exception:
                log.exception("eventlog.heard_hook_failed")

    async def _listen(self) -> None:
        """Keep a LISTEN connection open; on failure, polling carries readers until it is back."""
        assert self._dsn is not None

        def on_notify(_conn: Any, _pid: int, _channel: str, payload: object) -> None:
            with contextlib.suppress(ValueError):
                self.wakeup.notify(int(str(payload)))

        def on_batch(_conn: Any, pid: int, _channel: str, payload: object) -> None:
            first, _, rest = str(payload).partition(" ")
            last, _, events = rest.partition(" ")
            try:
                first_position, last_position = int(first), int(last)
            except ValueError:
                return
            if not self._believed(pid):
                # Only a wake-up: what readers then read comes from the table.
                self.wakeup.notify(last_position)
                return
            for hook in self.announced:
                try:
                    hook(first_position, last_position, events)
                except Exception:
                    log.exception("eventlog.announced_hook_failed", position=first_position)
            self.wakeup.notify(last_position)

        while True:
            lost = asyncio.Event()
            try:
                self._listener = await connect(self._dsn)
                self._listener.add_termination_listener(lambda _c, lost=lost: lost.set())
                # Each within the round trips' bound: a session gone silent here would
                # hold the listener for ever (its watch has not started)
                bound = self._session_check
                if self._announcements:
                    await within(bound, self._listener.add_listener(BATCHES, on_batch))
                await within(bound, self._listener.add_listener(CHANNEL, on_notify))
                # Nothing was notified to this process while it did not listen (at start,
                # or between a lost session and this one): the head as it is now, read
                # after LISTEN, so that a round trip's answer (_heard) never takes a head
                # from before a gap for the log's
                self.wakeup.notify(await within(bound, self._listener.fetchval(_HEAD)))
                watch = SessionWatch(self._listener, self._session_check, self._heard)
                await while_session_answers(watch, lost.wait())
            except (*_DB_ERRORS, SessionLost) as exc:
                log.warning("eventlog.listener_lost", error=error_text(exc))
            finally:
                if self._listener is not None:
                    with contextlib.suppress(*_DB_ERRORS):
                        await self._listener.close(timeout=CLOSE_TIMEOUT)
                    self._listener = None
            await asyncio.sleep(self.poll_interval)
