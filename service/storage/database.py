"""Database wiring: which PostgreSQL to use, the connection pool, and `schema.sql`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, NoReturn, TypeAlias, TypeVar

import asyncpg
import structlog
from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

from service.logs import error_text
from service.settings import ConfigError, Settings, url_has_password
from service.storage.embedded import EmbeddedPostgres

#: a connection, whether held directly or borrowed from a pool
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

T = TypeVar("T")

log = structlog.get_logger(__name__)

#: Sent at the start of every connection. PostgreSQL ends a session, and frees its locks and
#: its place in the notification queue, only once it learns that the client is gone. A
#: process that dies has its kernel close its connections; a host that loses power or its
#: network closes nothing, and with the server's defaults TCP keepalive takes 2 h 11 min to
#: find it gone (7200 s idle, then 9 probes 75 s apart), while the projections and the
#: notifier it held stand still and every host's `/readyz` refuses for the projections'
#: lag. With these the server probes a silent client after 10 s, then every 5 s, and (on
#: Linux, where `tcp_user_timeout` also bounds the probing) drops it once it has heard
#: nothing for 25 s with a probe out: 25-30 s after the client last spoke. A live client's
#: kernel answers the probes while its process is busy or paused; a client that stops
#: reading while the server sends (a listener's receive buffer full) is dropped after 25 s
#: all the same. Unix sockets ignore them. As startup parameters they override
#: `postgresql.conf` and `ALTER ROLE`; a setting named in DATABASE_URL's query
#: (`?tcp_keepalives_idle=60`, or `options=-c tcp_keepalives_idle=60`) is sent instead; one
#: that lets the server drop a session sooner than DROP_AT_LEAST is warned of by the lock
#: holders as they start (see SESSION_CHECK).
PEER_TIMEOUTS: dict[str, str] = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "25000",
}

#: how long a connection of its own (`connect`) may take to open; the lock holders and the
#: listener try again
CONNECT_TIMEOUT = 10.0
#: how long closing one may take before it is cut (a close waits for the server's answer)
CLOSE_TIMEOUT = 5.0


def session_settings(dsn: str) -> dict[str, str]:
    """The settings a connection to `dsn` sends at its start (asyncpg's `server_settings`,
    which would override the DSN's own): the peer timeouts DATABASE_URL does not set."""
    named = url_settings(dsn)
    return {name: value for name, value in PEER_TIMEOUTS.items() if name not in named}


def url_settings(dsn: str) -> dict[str, str]:
    """The server settings DATABASE_URL sets itself, by lower-case name (PostgreSQL's names
    ignore case): its query's (asyncpg sends each parameter it does not know itself as a
    setting, and drops a blank one: `?tcp_user_timeout=` sets nothing), and each
    `-c name=value` or `--name=value` of its `options`, which the server applies before the
    startup parameters (so one of ours would override it)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query)
    settings = {name.lower(): values[-1] for name, values in query.items()}
    words = re.split(r"(?<!\\)\s+", settings.pop("options", "").strip())
    for word, following in zip(words, [*words[1:], ""], strict=True):
        if word == "-c":
            word = following
        elif word.startswith(("-c", "--")):
            word = word[2:]
        else:
            continue
        name, equals, value = word.partition("=")
        if equals:
            settings[name.lower().replace("-", "_")] = value.replace("\\ ", " ")
    return settings


#: the units PostgreSQL takes in a time setting, in seconds
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def _seconds(value: str, unit: str) -> float:
    """A time setting as PostgreSQL reads it (a number, in `unit` unless it names its own)."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-z]*)\s*", value)
    if found is None or (found.group(2) or unit) not in _UNITS:
        raise ValueError(value)
    return float(found.group(1)) * _UNITS[found.group(2) or unit]


def dropped_after(dsn: str) -> float | None:
    """About how long after a client of `dsn` last spoke the server drops its session over
    TCP (Linux), from the peer timeouts the connection sets; None when DATABASE_URL sets
    one that cannot be read (the server refuses it at the start), or names Unix sockets
    only. 0 is the system's default: 2 h 11 min of keepalive, or no user timeout. With a
    user timeout the server gives up once a keepalive probe goes out after the timeout;
    without, after the probes."""
    if _unix_sockets_only(dsn):
        return None  # no TCP: a session ends when its client's process does
    given = {**PEER_TIMEOUTS, **url_settings(dsn)}
    try:
        user = _seconds(given["tcp_user_timeout"], "ms")
        idle = _seconds(given["tcp_keepalives_idle"], "s") or 7200.0
        interval = _seconds(given["tcp_keepalives_interval"], "s") or 75.0
        count = int(given["tcp_keepalives_count"]) or 9
    except ValueError:
        return None
    return max(user, idle) if user > 0 else idle + interval * count


def _unix_sockets_only(dsn: str) -> bool:
    """Whether every host `dsn` names is a Unix socket's directory (`%2Frun%2Fpg` before the
    path, or `?host=/run/pg` when none is there: asyncpg takes the first), which ignores
    the TCP settings."""
    parts = urllib.parse.urlsplit(dsn)
    hostspec = urllib.parse.unquote(parts.netloc.rpartition("@")[2])
    hosts = [hostspec] if hostspec else urllib.parse.parse_qs(parts.query).get("host", [])
    named = [h for host in hosts for h in host.split(",") if h]
    return bool(named) and all(h.startswith("/") for h in named)


async def connect(dsn: str) -> asyncpg.Connection[asyncpg.Record]:
    """A connection of its own, outside any pool: a lock holder's, a listener's."""
    conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
        dsn, server_settings=session_settings(dsn), timeout=CONNECT_TIMEOUT
    )
    return conn


#: How often a session that holds a lock, or listens, proves that it is alive: one round
#: trip, answered within as long. A connection cut off from the server looks open to its
#: client (nothing tells it otherwise) while the server drops the session 25-30 s after the
#: client last spoke (PEER_TIMEOUTS) and frees its locks for another process: a holder
#: that went on working would work beside the new one (two notifiers: an email sent twice),
#: and a listener would wait for ever on a session that no longer exists. Checked every
#: 5 s, a cut-off holder's work is stopped within 10 s of its last answered check, and only
#: then is its session ended: at least 15 s before the server frees the lock.
SESSION_CHECK = 5.0


def view_clock() -> float:
    """Seconds on a clock that goes on while the machine sleeps (Linux's CLOCK_BOOTTIME;
    elsewhere the monotonic clock): how old a view of the log is, which must count a
    suspended host's sleep as time the log moved on without it."""
    return _clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)
_clock_gettime = time.clock_gettime
#: the server should keep a silent session at least this long (`dropped_after`)
DROP_AT_LEAST = 3 * SESSION_CHECK

#: a session that failed: InternalClientError derives from neither of asyncpg's bases, and
#: is what a query raises when the server ends the connection under it
_SESSION_ERRORS = (
    TimeoutError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class SessionLost(Exception):
    """A session did not answer its check in time: its locks may soon be someone else's."""


class SessionWatch:
    """The round trips that prove a session (the one holding a lock, or listening) alive."""

    def __init__(
        self,
        conn: Conn,
        every: float = SESSION_CHECK,
        answered: Callable[[float], None] | None = None,
    ) -> None:
        self.conn = conn
        self.every = every
        #: called with when (view_clock()) each round trip that was answered began
        self.answered = answered
        self._turn = asyncio.Lock()  # one query at a time on a connection

    async def check(self) -> None:
        """One round trip now, answered within `every`, or SessionLost."""
        async with self._turn:
            began = view_clock()
            try:
                await within(self.every, self.conn.fetchval("SELECT 1"))
            except _SESSION_ERRORS as exc:
                said = f"the session did not answer within {self.every:g} s ({error_text(exc)})"
                raise SessionLost(said) from exc
            if self.answered is not None:
                self.answered(began)

    async def watch(self) -> NoReturn:
        while True:
            await asyncio.sleep(self.every)
            await self.check()


def warn_if_dropped_too_soon(dsn: str) -> None:
    """Said once by each process that takes a lock (the projection runners, the notifier)
    when DATABASE_URL's TCP settings let the server drop a silent session sooner than
    DROP_AT_LEAST: a host cut off from it could see its locks go to another host while
    its own work still runs."""
    dropped = dropped_after(dsn)
    if dropped is not None and dropped < DROP_AT_LEAST:
        log.warning(
            "database.peer_timeouts_short",
            dropped_after_s=dropped,
            at_least_s=DROP_AT_LEAST,
            detail="DATABASE_URL's TCP settings let the server drop a silent session "
            "before a host cut off from it has stopped its projections and notifier: "
            "their locks could go to another host while it still works",
        )


@contextlib.asynccontextmanager
async def lock_session(dsn: str, key: int) -> AsyncIterator[SessionWatch | None]:
    """A session of its own holding advisory lock `key`, with the watch that proves it
    alive (None: another session holds the lock; stand by and try again later). Leaving
    ends the session, which frees the lock: a close waits for the server's answer, so it
    is bounded (CLOSE_TIMEOUT), and one the watch found lost is already ended."""
    conn = await connect(dsn)
    try:
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            yield SessionWatch(conn)
        else:
            yield None
    finally:
        with contextlib.suppress(*_SESSION_ERRORS):
            await conn.close(timeout=CLOSE_TIMEOUT)


async def while_session_answers(watch: SessionWatch, *work: Coroutine[Any, Any, object]) -> None:
    """Run `work` beside `watch` until one of them ends. When the session stops answering,
    the work is stopped first and the connection ended after (a lock is freed for another
    process only once nothing here acts on it any more); then SessionLost is raised."""
    try:
        await until_one_ends(*work, watch.watch())
    except SessionLost:
        watch.conn.terminate()  # a close would wait for the dead connection
        raise


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
#: how long applying the schema waits for any one lock before it gives back every lock it
#: holds (the transaction rolled back) and tries again a moment later: under PostgreSQL's
#: deadlock_timeout (1 s by default), so that a running host waiting on a lock it took finds
#: it given back before its own deadlock check could end its transaction instead
SCHEMA_LOCK_WAIT = 0.5


async def apply_schema(conn: Conn, *, lock_wait: float = SCHEMA_LOCK_WAIT) -> None:
    """Apply `schema.sql` unless this very text has been applied already.

    Every statement in it is idempotent, but some take table locks (the trigger on
    `events`, columns added to projection tables) that queue behind a running service's
    writers and then hold them back: a second process starting, or a command such as
    `tollgate events`, would stall the log's appends for nothing. So the text's digest is
    kept in `schema_applied`, and a start that finds it there reads one row and is done.

    A lock the text waits for is waited for `lock_wait` at most: the locks it took before
    are held until it commits, and waiting behind a report on a view it replaces, or a
    backup, held every running host's statements on those tables (sign-ins, checkpoints,
    `/readyz`) for as long as the report ran. Rolled back (so too when a deadlock check
    picks it), it lets go of all of them, and tries again until SCHEMA_TIMEOUT."""
    sql = schema_sql()
    digest = hashlib.sha256(sql.encode()).hexdigest()
    try:
        if await conn.fetchval("SELECT true FROM schema_applied WHERE digest = $1", digest):
            return
    except asyncpg.UndefinedTableError:
        pass  # a database that has never seen this schema
    script = (
        "BEGIN;\nSET LOCAL statement_timeout = 0;\n"
        f"SET LOCAL lock_timeout = {int(lock_wait * 1000)};\n"
        f"{sql}\nINSERT INTO schema_applied (digest) VALUES ('{digest}') "
        "ON CONFLICT (digest) DO UPDATE SET applied_at = now();\nCOMMIT;"
    )
    deadline = time.monotonic() + SCHEMA_TIMEOUT
    pause = lock_wait / 2
    for attempt in itertools.count(1):
        try:
            await conn.execute(script, timeout=max(1.0, deadline - time.monotonic()))
            return
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
            # a deadlock: its locks crossed a running session's, and the check was its own
            if conn.is_in_transaction():
                await conn.execute("ROLLBACK")
            if time.monotonic() + pause > deadline:
                raise
            log.info("schema.lock_busy", attempt=attempt, error=error_text(exc))
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10.0)


def dsn_refused(dsn: str, exc: ValueError) -> str:
    """Why DATABASE_URL was refused, in one line that quotes none of its password: the
    driver's message may hold a piece of a password left unencoded (`u:s3c/ret@host` is
    read as the port `s3c`)."""
    if url_has_password(dsn):
        return (
            "DATABASE_URL: not a URL the driver reads; percent-encode / ? # @ : in the "
            "password (the driver's message is not shown: it may quote the password)"
        )
    return f"DATABASE_URL: {exc}"


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
            raise ConfigError(dsn_refused(dsn, exc)) from None
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
