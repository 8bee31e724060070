"""Database wiring: which PostgreSQL to use, the connection pool, and `schema.sql`."""

from __future__ import annotations

import asyncio
import hashlib
import urllib.parse
from collections.abc import Coroutine
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

from service.settings import ConfigError, Settings
from service.storage.embedded import EmbeddedPostgres

#: a connection, whether held directly or borrowed from a pool
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

T = TypeVar("T")

#: Sent at the start of every connection. PostgreSQL ends a session, and frees its locks and
#: its place in the notification queue, only once it learns that the client is gone. A
#: process that dies has its kernel close its connections; a host that loses power or its
#: network closes nothing, and with the server's defaults TCP keepalive takes 2 h 11 min to
#: find it gone (7200 s idle, then 9 probes 75 s apart), while the projections and the
#: notifier it held stand still and every host's `/readyz` refuses for the projections'
#: lag. With these the server probes a silent client after 10 s, every 5 s, and drops it
#: 25 s after it last heard from it; `tcp_user_timeout` bounds data left unacknowledged (a
#: listener's notifications) the same way. A live client's kernel answers the probes
#: whatever its process is doing. Unix sockets ignore them. A setting of the same name in
#: DATABASE_URL's query (`?tcp_keepalives_idle=60`) is sent instead.
PEER_TIMEOUTS: dict[str, str] = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "25000",
}


def session_settings(dsn: str) -> dict[str, str]:
    """The settings a connection to `dsn` sends at its start (asyncpg's `server_settings`,
    which would override the DSN's own)."""
    named = urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query, keep_blank_values=True)
    return {name: value for name, value in PEER_TIMEOUTS.items() if name not in named}


async def connect(dsn: str) -> asyncpg.Connection[asyncpg.Record]:
    """A connection of its own, outside any pool: a lock holder's, a listener's."""
    conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
        dsn, server_settings=session_settings(dsn)
    )
    return conn


#: How often a session that holds a lock, or listens, proves that it is alive: one round
#: trip, answered within as long. A connection cut off from the server looks open to its
#: client (nothing tells it otherwise) while the server drops the session 20-25 s after the
#: last round trip (PEER_TIMEOUTS) and frees its locks for another process: a holder that
#: went on working would work beside the new one (two notifiers: an email sent twice), and
#: a listener would wait for ever on a session that no longer exists. Checked every 5 s,
#: a cut-off holder stops within 10 s, before its lock can go to anyone else.
SESSION_CHECK = 5.0


class SessionLost(Exception):
    """A session did not answer its check in time: its locks may already be someone else's."""


async def session_alive(conn: Conn, every: float = SESSION_CHECK) -> None:
    """Check `conn` every `every` seconds until it fails to answer within `every`, then
    terminate it and raise SessionLost; run beside the work its lock or LISTEN guards."""
    while True:
        await asyncio.sleep(every)
        try:
            await within(every, conn.fetchval("SELECT 1"))
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            conn.terminate()  # a close would wait on the dead connection
            raise SessionLost(f"the session did not answer within {every:g} s") from exc


async def until_one_ends(*work: Coroutine[Any, Any, object]) -> None:
    """Run the coroutines side by side until one of them returns or fails; cancel the
    others; raise its error, if any."""
    tasks = [asyncio.create_task(coroutine) for coroutine in work]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()


# Work given up on by `within` finishes (and releases its connection) in the background;
# asyncio holds tasks only weakly, so they are kept here until they are done.
_abandoned: set[asyncio.Task[Any]] = set()


def schema_sql() -> str:
    """`schema.sql`, shipped inside the package (a link to the repository's top-level file,
    which stays the one source), so an installed wheel finds it as an editable install does."""
    return files("service").joinpath("schema.sql").read_text(encoding="utf-8")


@dataclass
class Database:
    dsn: str
    pool: asyncpg.Pool
    embedded: EmbeddedPostgres | None = None

    async def close(self) -> None:
        await self.pool.close()
        if self.embedded is not None:
            self.embedded.stop()


class BoundedPool(asyncpg.Pool):
    """A pool whose every wait is bounded on the client side: for a connection (acquire),
    and, through `command_timeout`, for each statement. `timeout` is that bound. A
    statement that times out is cancelled; asyncpg waits at most another `timeout` for a
    (frozen) server to acknowledge that before it drops the connection, so one call on the
    pool gives up within twice the bound, and `within` gives up within one."""

    def __init__(self, dsn: str, *, bound: float | None, **kwargs: Any) -> None:
        super().__init__(dsn, **kwargs)
        self.timeout = bound

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext[asyncpg.Record]:
        return super().acquire(timeout=self.timeout if timeout is None else timeout)


async def within(seconds: float, work: Coroutine[Any, Any, T]) -> T:
    """`work`, or TimeoutError after `seconds` however the database behaves: unlike
    `asyncio.wait_for`, it does not wait for the cancelled work to wind down (a frozen
    server may never let it); the work is cancelled and finishes in the background."""
    task = asyncio.ensure_future(work)
    try:
        async with asyncio.timeout(seconds):  # wait_for may swallow a cancellation (3.11)
            return await asyncio.shield(task)
    except BaseException:
        if not task.done():
            task.cancel()
            _abandoned.add(task)
            task.add_done_callback(_forget)
        raise


def _forget(task: asyncio.Task[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: given up on, its failure is no news


def resolve_dsn(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """`DATABASE_URL` when set, else the embedded server under `DATA_DIR` (started here)."""
    if settings.database_url:
        return settings.database_url, None
    embedded = EmbeddedPostgres(settings.pg_dir)
    return embedded.start(), embedded


#: how long applying the schema may take: a migration may rightly outlast a request's
#: bound (an index on a large table); asyncpg reads `timeout=None` as the pool's bound
SCHEMA_TIMEOUT = 3600.0


async def apply_schema(conn: Conn) -> None:
    """Apply `schema.sql` unless this very text has been applied already.

    Every statement in it is idempotent, but some take table locks (the trigger on
    `events`, columns added to projection tables) that queue behind a running service's
    writers and then hold them back: a second process starting, or a command such as
    `tollgate events`, would stall the log's appends for nothing. So the text's digest is
    kept in `schema_applied`, and a start that finds it there reads one row and is done."""
    sql = schema_sql()
    digest = hashlib.sha256(sql.encode()).hexdigest()
    try:
        if await conn.fetchval("SELECT true FROM schema_applied WHERE digest = $1", digest):
            return
    except asyncpg.UndefinedTableError:
        pass  # a database that has never seen this schema
    await conn.execute(
        "BEGIN;\nSET LOCAL statement_timeout = 0;\nSET LOCAL lock_timeout = 0;\n"
        f"{sql}\nINSERT INTO schema_applied (digest) VALUES ('{digest}') "
        "ON CONFLICT (digest) DO UPDATE SET applied_at = now();\nCOMMIT;",
        timeout=SCHEMA_TIMEOUT,
    )


async def open_database(settings: Settings, *, min_size: int = 2) -> Database:
    dsn, embedded = resolve_dsn(settings)
    try:
        try:
            pool = await create_pool(
                dsn,
                min_size=min_size,
                max_size=settings.pool_size,
                bound=settings.db_timeout,
                connect_timeout=settings.db_connect_timeout,
            )
        except ValueError as exc:  # a DATABASE_URL asyncpg cannot parse (port "x", ...)
            raise ConfigError(f"DATABASE_URL: {exc}") from None
        async with pool.acquire() as conn:
            await apply_schema(conn)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
    return Database(dsn, pool, embedded)


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    bound: float | None = None,
    connect_timeout: float = 60.0,
) -> asyncpg.Pool:
    """A pool; with `bound` (seconds), a bounded one (see BoundedPool), whose statements the
    server also stops after that long, so one the client gave up on holds no lock for long."""
    server_settings = session_settings(dsn)
    if bound is not None:
        ms = str(int(bound * 1000))
        server_settings.update(statement_timeout=ms, lock_timeout=ms)
    pool = BoundedPool(
        dsn,
        bound=bound,
        min_size=min_size,
        max_size=max_size,
        max_queries=50000,
        max_inactive_connection_lifetime=300.0,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        command_timeout=bound,
        timeout=connect_timeout,
        server_settings=server_settings,
    )

    async def started() -> BoundedPool:
        return await pool

    try:
        await within(connect_timeout, started())
    except TimeoutError:
        # `within` cancelled the pool's start, and asyncpg closes whatever connections a
        # cancelled start had opened (terminate() now would refuse: "being initialized")
        raise TimeoutError(
            f"the database did not answer within {connect_timeout:g} s (DB_CONNECT_TIMEOUT)"
        ) from None
    return pool
