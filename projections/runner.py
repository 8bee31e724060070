"""Checkpointed subscriptions that keep the SQL read models up to date.

A projection's rows and its checkpoint change in one transaction, so a crash between
batches neither applies an event twice nor skips one: on restart the projection resumes
from the checkpoint that committed with its last batch. Only one instance of each
projection runs at a time across processes: the worker holds a session-level advisory lock
for as long as it runs, and the checkpoint update is also conditional on the position it
started from, so even a worker whose lock connection silently died cannot double-apply.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import structlog

from projections.base import Projection, SqlRangeProjection
from projections.snapshots import SnapshotWriter
from service.eventlog import EventLog, EventLogUnavailable, RecordedEvent
from service.events import UnknownEvent, UnknownEventType
from service.logs import error_text
from service.storage.database import (
    Conn,
    SessionLost,
    connect,
    lock_session,
    warn_if_dropped_too_soon,
    while_session_answers,
)

log = structlog.get_logger(__name__)

_DB_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    EventLogUnavailable,
)


#: A projection's batch commits without waiting for its WAL to reach the disk. What it
#: writes is derived: a crash that loses the last batches (at most wal_writer_delay's
#: worth) takes their rows and their checkpoint together, and the runner applies them again
#: from the log, whose appends do wait for their flush. Nothing that waited for its own flush
#: can have built on a lost batch: a later flush covers all WAL written before it. The
#: appends' flushes no longer queue behind the projections' (under `make bench`'s token
#: load, 20-29% fewer WAL flushes per token with one serving process, 14-18% with two).
#: SET LOCAL: the setting ends with the transaction, so the pool's connections keep the
#: durable default for whatever they run next.
NO_FLUSH_WAIT = "SET LOCAL synchronous_commit = off"


class CheckpointMoved(Exception):
    """The checkpoint changed under a worker (a rebuild, or another instance)."""


class RebuildInProgress(Exception):
    """Another rebuild of the same projection is running (they would share its work schema)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"a rebuild of {name!r} is already running; try again when it ends")


def lock_key(name: str) -> int:
    digest = hashlib.sha256(f"tollgate.projection.{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True)
class ProjectionStatus:
    name: str
    position: int
    head: int
    lag_events: int
    #: age of the oldest event not yet applied, on the database's clock alone (since the
    #: row was written: `appended_at`, not the writing host's `recorded_at`); 0 when caught up
    lag_seconds: float
    updated_at: datetime | None
    #: the event at `position` is not the one the checkpoint saw there: the log was cut and
    #: written again (schema.sql, projection_checkpoints_saw), and the checkpoint cannot move
    rewritten: bool = False


Progress = Callable[[str, int, int], None]


class ProjectionRunner:
    def __init__(
        self,
        eventlog: EventLog,
        pool: asyncpg.Pool,
        dsn: str,
        projections: Sequence[Projection],
        *,
        batch_size: int = 5000,
        standby_interval: float = 2.0,
        linger: float = 0.05,
        moved: Callable[[str, int], None] | None = None,
        snapshots: SnapshotWriter | None = None,
    ) -> None:
        self.eventlog = eventlog
        self.pool = pool
        self.dsn = dsn
        self.projections = {p.name: p for p in projections}
        self.batch_size = batch_size
        self.standby_interval = standby_interval
        #: seconds to wait after a step that applied something, before the next: under
        #: load a step then carries tens of events instead of a few, and its fixed cost
        #: (the head, a read, a transaction: six round trips) is paid per batch rather than
        #: per event. The first event after a quiet spell is applied at once.
        self.linger = linger
        #: told after each committed batch (a step, or one of a catch-up): the projection's
        #: name and how many positions of the log it moved past (Metrics.projection_moved)
        self.moved = moved
        #: writes snapshots of the in-memory models beside the projections (run_forever)
        self.snapshots = snapshots

    # --- running ---------------------------------------------------------------------

    async def run_forever(self) -> None:
        warn_if_dropped_too_soon(self.dsn)
        if self.moved is not None:  # every projection run here is counted from zero
            for name in self.projections:
                self.moved(name, 0)
        async with asyncio.TaskGroup() as group:
            for projection in self.projections.values():
                group.create_task(self._supervise(projection), name=f"projection-{projection.name}")
            group.create_task(self._sweep_forever(), name="projection-sweeper")
            if self.snapshots is not None:
                group.create_task(self.snapshots.run_forever(), name="model-snapshots")

    async def _sweep_forever(self, every: float = 60.0) -> None:
        """Expired rows leave the tables that keep them (`live_tokens`): lookups stay fast
        as years of tokens pile up in the log. Idempotent, so any process may do it."""
        while True:
            for projection in self.projections.values():
                sweep = getattr(projection, "sweep_expired", None)
                if sweep is None:
                    continue
                try:
                    dropped = await sweep(self.pool)
                except _DB_ERRORS as exc:
                    log.warning(
                        "projection.sweep_failed", projection=projection.name, error=error_text(exc)
                    )
                    continue
                if dropped:
                    log.info("projection.swept", projection=projection.name, rows=dropped)
            await asyncio.sleep(every)

    async def _supervise(self, projection: Projection) -> None:
        failures = 0
        while True:
            try:
                await self._run_locked(projection)
                failures = 0
            except (*_DB_ERRORS, CheckpointMoved, SessionLost) as exc:
                log.warning(
                    "projection.restarting",
                    projection=projection.name,
                    error=error_text(exc),
                )
            except Exception:
                # An event it cannot apply (one a newer version wrote, say): it stops before
                # it, with its checkpoint unmoved and its lock released, so that a process
                # that knows the event can take over; and says so.
                failures += 1
                log.exception("projection.failed", projection=projection.name)
                await asyncio.sleep(min(30.0, self.standby_interval * 2**failures))
            await asyncio.sleep(self.standby_interval)

    async def _run_locked(self, projection: Projection) -> None:
        async with lock_session(self.dsn, lock_key(projection.name)) as watch:
            if watch is None:
                return  # another process runs it; stand by and try again later
            log.info("projection.started", projection=projection.name)
            await while_session_answers(watch, self._follow(projection, watch.conn))

    async def _follow(self, projection: Projection, conn: Conn) -> None:
        position = await self.checkpoint(projection.name)
        while not conn.is_closed():
            new_position = await self.step(projection, position)
            await self.eventlog.wakeup.between_runs(
                position, new_position, self.eventlog.poll_interval, self.linger
            )
            position = new_position

    async def catch_up(self, name: str, progress: Progress | None = None) -> int:
        """Apply everything up to the head as it is now; return the final position.

        The next batch is read while the current one is written, so reading and writing
        overlap on the two sides of the connection.
        """
        projection = self.projections[name]
        head = await self.eventlog.head()
        position = await self.checkpoint(name)
        while position < head:
            try:
                position = await self._catch_up_from(projection, position, head, progress)
            except CheckpointMoved:
                # Another worker (the service's own) moved it: carry on from where it is.
                position = await self.checkpoint(name)
        return position

    async def _catch_up_from(
        self, projection: Projection, position: int, head: int, progress: Progress | None
    ) -> int:
        upcoming = asyncio.ensure_future(self._read(projection, position, head))
        try:
            while position < head:
                batch, new_position = await upcoming
                if new_position < head:
                    upcoming = asyncio.ensure_future(self._read(projection, new_position, head))
                await self._write(projection, position, new_position, batch)
                position = new_position
                if progress is not None:
                    progress(projection.name, position, head)
        finally:
            upcoming.cancel()
        return position

    async def step(self, projection: Projection, position: int) -> int:
        """Apply one batch after `position`; return the new checkpoint."""
        # The head is read first: every event at or below it has committed (positions
        # follow commit order), so a filtered read may safely move the checkpoint up to it.
        head = await self.eventlog.head()
        if head <= position:
            return position
        batch, new_position = await self._read(projection, position, head)
        await self._write(projection, position, new_position, batch)
        return new_position

    async def _read(
        self, projection: Projection, position: int, head: int
    ) -> tuple[list[RecordedEvent], int]:
        """The next batch after `position` and the position it takes the projection to. A
        projection the database computes over a range reads nothing: its batch is a range
        of at most `batch_size` positions (they are dense)."""
        if isinstance(projection, SqlRangeProjection):
            return [], min(head, position + self.batch_size)
        types = sorted(projection.event_types) if projection.event_types is not None else None
        batch = await self.eventlog.read_all(
            position, self.batch_size, types=types, until=head, lean=projection.lean
        )
        if projection.lean:
            # A full read raises on an event this version cannot read; a lean one hands it
            # over as UnknownEvent. Either way the projection stops before it.
            for recorded in batch:
                if isinstance(recorded.event, UnknownEvent):
                    unread = f"{recorded.type} (schema version {recorded.schema_version})"
                    raise UnknownEventType(
                        f"{unread} at position {recorded.position} cannot be read by this version"
                    )
        return batch, batch[-1].position if len(batch) == self.batch_size else head

    @staticmethod
    async def _apply(
        conn: Conn, projection: Projection, position: int, new_position: int,
        batch: list[RecordedEvent],
    ) -> None:  # fmt: skip
        if isinstance(projection, SqlRangeProjection):
            await projection.apply_range(conn, position, new_position)
        elif batch:
            await projection.apply(conn, batch)

    async def _write(
        self,
        projection: Projection,
        position: int,
        new_position: int,
        batch: list[RecordedEvent],
    ) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            # Committed without waiting for its WAL flush (NO_FLUSH_WAIT).
            await conn.execute(NO_FLUSH_WAIT)
            # The checkpoint row first: a rebuild's switch takes it first too, so the two
            # queue up instead of deadlocking on the projection's rows.
            current = await conn.fetchval(
                "SELECT position FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
                projection.name,
            )
            if current != position:
                raise CheckpointMoved(projection.name)
            await self._apply(conn, projection, position, new_position, batch)
            await conn.execute(
                "UPDATE projection_checkpoints SET position = $2, updated_at = now() "
                "WHERE name = $1",
                projection.name,
                new_position,
            )
        if self.moved is not None:  # committed
            self.moved(projection.name, new_position - position)

    # --- bookkeeping -----------------------------------------------------------------

    async def ensure_checkpoints(self) -> None:
        """Each projection's checkpoint row, made when missing. Read first: on a database
        that refuses writes (a read-only endpoint, a standby) a start that finds them all
        writes nothing, and serves; `/readyz` says the database refuses writes."""
        present = await self.pool.fetch(
            "SELECT name FROM projection_checkpoints WHERE name = ANY($1::text[])",
            list(self.projections),
        )
        missing = [name for name in self.projections if name not in {r["name"] for r in present}]
        if missing:
            await self.pool.executemany(
                "INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING",
                [(name,) for name in missing],
            )

    async def checkpoint(self, name: str) -> int:
        value = await self.pool.fetchval(
            "SELECT position FROM projection_checkpoints WHERE name = $1", name
        )
        if value is None:
            await self.ensure_checkpoints()
            return 0
        return int(value)

    async def rebuild(self, name: str, progress: Progress | None = None) -> int:
        """Rebuild a projection from position 0 beside the live one, then switch.

        The projection runs into copies of its tables in a schema of their own (its SQL
        names tables without a schema, so `search_path` points it there) while the live
        tables keep serving. The switch is one transaction: it takes the checkpoint row
        (a running worker finishes its batch first, then waits), applies what arrived
        since, replaces the live rows with the rebuilt ones and moves the checkpoint.
        Readers see the old rows until it commits, then the new ones.
        """
        projection = self.projections[name]
        shadow = f"rebuild_{name}"
        # A connection of its own: its statement cache points at the copies, and it must
        # not go back to the pool like that.
        conn = await connect(self.dsn)
        try:
            # One rebuild of a projection at a time: two would drop and fill each other's
            # work schema and switch in a mix of both. Released when the connection closes.
            if not await conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", lock_key(f"rebuild:{name}")
            ):
                raise RebuildInProgress(name)
            await conn.execute(f"DROP SCHEMA IF EXISTS {shadow} CASCADE; CREATE SCHEMA {shadow}")
            try:
                for table in projection.tables:
                    await conn.execute(
                        f"CREATE TABLE {shadow}.{table} (LIKE public.{table} INCLUDING ALL)"
                    )
                await conn.execute(f"SET search_path = {shadow}, public")
                position = await self._build(
                    conn, projection, 0, await self.eventlog.head(), progress
                )
                async with conn.transaction():
                    # Built from the log as it is: its checkpoint moves whatever it saw.
                    await conn.execute("SET LOCAL tollgate.rebuild = 'on'")
                    await conn.execute(
                        "SELECT position FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
                        name,
                    )
                    head = await self.eventlog.head()
                    position = await self._build(conn, projection, position, head, None)
                    for table in projection.tables:
                        await conn.execute(f"DELETE FROM public.{table}")
                        await conn.execute(
                            f"INSERT INTO public.{table} SELECT * FROM {shadow}.{table}"
                        )
                    await conn.execute(
                        "UPDATE projection_checkpoints SET position = $2, updated_at = now() "
                        "WHERE name = $1",
                        name,
                        position,
                    )
            finally:
                await conn.execute(f"DROP SCHEMA IF EXISTS {shadow} CASCADE")
        finally:
            await conn.close()
        if progress is not None:
            progress(name, position, position)
        return position

    async def _build(
        self,
        conn: Conn,
        projection: Projection,
        position: int,
        head: int,
        progress: Progress | None,
    ) -> int:
        """Apply events (position, head] on `conn` (whatever its search_path says)."""
        while position < head:
            batch, new_position = await self._read(projection, position, head)
            if conn.is_in_transaction():
                await self._apply(conn, projection, position, new_position, batch)
            else:
                async with conn.transaction():
                    await self._apply(conn, projection, position, new_position, batch)
            position = new_position
            if progress is not None:
                progress(projection.name, position, head)
        return position

    async def status(self, names: Sequence[str] | None = None) -> list[ProjectionStatus]:
        """Read-only (a probe or a scrape writes nothing); a projection that never ran
        shows at position 0. The lag's age is taken on the database's clock, one clock for
        every host that asks: a prober's own clock, set wrong, moves no answer. `names`:
        the checkpoints to read, if not this runner's projections' (the notifier's too)."""
        rows = await self.pool.fetch(
            """
            SELECT c.name, c.position, c.updated_at, h.head,
                   (SELECT extract(epoch FROM clock_timestamp()
                                              - coalesce(e.appended_at, e.recorded_at))::float8
                    FROM events e WHERE e.position = c.position + 1) AS oldest_pending_age,
                   c.saw IS NOT NULL AND c.position <= h.head
                   AND c.saw IS DISTINCT FROM (SELECT e.hash FROM events e
                                               WHERE e.position = c.position) AS rewritten
            FROM (SELECT n.name, coalesce(p.position, 0) AS position, p.updated_at,
                         p.position_hash AS saw
                  FROM unnest($1::text[]) AS n(name)
                  LEFT JOIN projection_checkpoints p ON p.name = n.name) c
            CROSS JOIN (SELECT coalesce(max(position), 0) AS head FROM events) h
            ORDER BY c.name
            """,
            list(self.projections) if names is None else list(names),
        )
        return [
            ProjectionStatus(
                name=row["name"],
                position=row["position"],
                head=row["head"],
                lag_events=row["head"] - row["position"],
                lag_seconds=max(0.0, row["oldest_pending_age"] or 0.0),
                updated_at=row["updated_at"],
                rewritten=row["rewritten"],
            )
            for row in rows
        ]
