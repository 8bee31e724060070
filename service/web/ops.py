"""Operations endpoints: liveness, readiness, Prometheus metrics, and the request metrics."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import asyncpg
import structlog
from aiohttp import web

from projections import snapshots
from service.errors import InvalidRequest, Unauthorized
from service.eventlog import EventLogUnavailable
from service.logs import error_text
from service.metrics import METRICS
from service.notification.notifier import NAME as NOTIFIER
from service.storage.database import within as bounded
from service.web.keys import SETTINGS, authorization_header

T = TypeVar("T")

if TYPE_CHECKING:
    from projections.runner import ProjectionRunner, ProjectionStatus
    from service.settings import Settings

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

# ProjectionRunner.status() queries the pool directly, so driver errors reach this far.
# InternalClientError derives from neither of asyncpg's bases: it is what a query raises
# when the server ends the connection under it (seen when the database went away).
_DB_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    EventLogUnavailable,
)


@dataclass(frozen=True)
class ReadinessPolicy:
    """How far behind the log a SQL projection may be while the service is still ready:
    the age of the oldest event it has not applied, and, when set, how many there are. A
    count alone misjudges load: the events waiting for a projection's next step grow with
    the log's rate (about 900 at 8,000 tokens a second, 0.12 s behind), so a bound of a
    thousand would take every host out of rotation at its busiest, all at once.

    The age's bound, 60 s by default, outlasts the projections' handover: they run on one
    host at a time for every host, and when that host vanishes another takes them over
    within about 30 s (the server's peer timeouts). Meanwhile every host is equally behind
    and serves tokens and the gateway from its own memory: a bound below the handover
    would take every host out of rotation at once, for nothing."""

    max_lag_events: int | None = None
    max_lag_seconds: float = 60.0
    #: a database that takes longer than this to answer counts as unreachable
    timeout: float = 2.0

    @classmethod
    def of(cls, settings: Settings) -> ReadinessPolicy:
        """READY_MAX_LAG and READY_MAX_LAG_EVENTS (0: not counted)."""
        return cls(
            max_lag_events=settings.ready_max_lag_events or None,
            max_lag_seconds=settings.ready_max_lag,
        )


READINESS = web.AppKey("readiness", ReadinessPolicy)


def _policy(request: web.Request) -> ReadinessPolicy:
    """The one given to the application (tests), else the settings'."""
    given = request.config_dict.get(READINESS)
    return given if given is not None else ReadinessPolicy.of(request.config_dict[SETTINGS])


def _runner(request: web.Request) -> ProjectionRunner:
    # service.app imports this module for its routes, so its keys are imported when needed.
    from service.app import RUNNER

    return request.config_dict[RUNNER]


async def _read_or_none(within: float, reading: Coroutine[Any, Any, T], event: str) -> T | None:
    """What `reading` reads, or None (logged as `event`) when the database does not answer
    in time. The bound holds whatever the database does: a frozen server never acknowledges
    the cancellation that `asyncio.wait_for` would wait for."""
    try:
        return await bounded(within, reading)
    except (*_DB_ERRORS, TimeoutError) as exc:
        log.warning(event, error=error_text(exc))
        return None


async def _statuses(runner: ProjectionRunner, within: float) -> list[ProjectionStatus] | None:
    """Every SQL projection's status, or None when the database does not answer in time."""
    return await _read_or_none(within, runner.status(), "ops.database_unreachable")


async def _notification_queue(pool: asyncpg.Pool, within: float) -> float | None:
    """How full PostgreSQL's notification queue is (0 to 1), or None when the database
    does not answer in time (tollgate_database_up says so)."""
    usage = pool.fetchval("SELECT pg_notification_queue_usage()")
    found = await _read_or_none(within, usage, "ops.notification_queue_unread")
    return None if found is None else float(found)


async def _write_refused(pool: asyncpg.Pool, within: float) -> tuple[str, str] | None:
    """Why a write would fail now, and the error (None: it would succeed), found by
    writing a row in a transaction that is rolled back: a read-only or recovering database
    answers reads and refuses every token, so it is not ready."""

    async def probe() -> None:
        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                await conn.execute("INSERT INTO readiness_probe DEFAULT VALUES")
            finally:
                await transaction.rollback()

    try:
        await bounded(within, probe())
    except asyncpg.PostgresError as exc:
        if isinstance(exc, asyncpg.PostgresConnectionError):
            return _UNREACHABLE, error_text(exc)
        log.warning("ops.database_refuses_writes", error=type(exc).__name__, sqlstate=exc.sqlstate)
        return "database refuses writes", type(exc).__name__
    except (*_DB_ERRORS, TimeoutError) as exc:
        return _UNREACHABLE, error_text(exc)
    return None


_UNREACHABLE = "database unreachable"


class DatabaseWatch(Protocol):
    """The embedded PostgreSQL as `/healthz` sees it (`EmbeddedPostgres`)."""

    def running(self) -> bool: ...


#: set when the service runs on the embedded PostgreSQL, which nothing else watches
DATABASE_WATCH = web.AppKey("database_watch", DatabaseWatch)


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Liveness: 503 while the embedded PostgreSQL this process depends on is known dead
    (being restarted, or given up on), so that a supervisor does not count a service that
    answers 503 to every token request as healthy. A database that is merely slow, or an
    external one, is /readyz's business."""
    watch = request.config_dict.get(DATABASE_WATCH)
    if watch is not None and not watch.running():
        body = {"status": "unhealthy", "reasons": ["database down"]}
        return web.json_response(body, status=503, headers={"Cache-Control": "no-store"})
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """200 when the database answers and every SQL projection is within the policy's lag;
    503 with the reasons otherwise (a load balancer stops sending traffic meanwhile)."""
    policy = _policy(request)
    runner = _runner(request)
    statuses, refused = await asyncio.gather(
        _statuses(runner, policy.timeout), _write_refused(runner.pool, policy.timeout)
    )
    if statuses is None:
        # the driver's message stays in the log (said once, by the read that failed): it
        # may name hosts and users
        return _readiness([_UNREACHABLE], [])
    if refused is not None and refused[0] == _UNREACHABLE:  # the reads answered: said here
        log.warning("ops.database_unreachable", error=refused[1])
    reasons: list[str] = [refused[0]] if refused else []
    for s in statuses:
        if s.lag_events < 0:
            # Positions only grow: the log lost its tail, and the events appended next
            # would take positions this projection holds as applied, and be skipped.
            reasons.append(
                f"projection {s.name} is at {s.position}, past the log's head {s.head}: "
                "events were removed from the log (tollgate audit verify)"
            )
        if s.rewritten:
            reasons.append(
                f"the event at position {s.position} is not the one {s.name} applied there: "
                "the log was cut and written again (tollgate audit verify, then "
                "tollgate projections rebuild)"
            )
        if policy.max_lag_events is not None and s.lag_events > policy.max_lag_events:
            reasons.append(
                f"projection {s.name} is {s.lag_events} events behind "
                f"(at most {policy.max_lag_events})"
            )
        if s.lag_seconds > policy.max_lag_seconds:
            reasons.append(
                f"projection {s.name} is {s.lag_seconds:.1f} s behind "
                f"(at most {policy.max_lag_seconds:g} s)"
            )
    projections = [
        {"name": s.name, "lag_events": s.lag_events, "lag_seconds": round(s.lag_seconds, 3)}
        for s in statuses
    ]
    return _readiness(reasons, projections)


def _readiness(reasons: list[str], projections: list[dict[str, Any]]) -> web.Response:
    if reasons:
        body = {"status": "not_ready", "reasons": reasons, "projections": projections}
        return web.json_response(body, status=503, headers={"Cache-Control": "no-store"})
    body = {"status": "ready", "projections": projections}
    return web.json_response(body, headers={"Cache-Control": "no-store"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """The Prometheus exposition; projection lag is read now. With METRICS_TOKEN set, only
    for `Authorization: Bearer <METRICS_TOKEN>` (401 otherwise)."""
    token = request.config_dict[SETTINGS].metrics_token
    if token is not None:
        _check_metrics_token(request, token)
    recorder = request.config_dict[METRICS]
    runner = _runner(request)
    policy = _policy(request)
    # The notifier follows the log as the projections do, from a checkpoint of its own:
    # one that does not move (no process holds its lock, or the one that does is stuck)
    # sends no email, and says nothing of it anywhere else.
    names = [*runner.projections, NOTIFIER]
    read, queue, snapshot = await asyncio.gather(
        _read_or_none(policy.timeout, runner.status(names), "ops.database_unreachable"),
        _notification_queue(runner.pool, policy.timeout),
        _read_or_none(policy.timeout, snapshots.behind(runner.pool), "ops.snapshot_unread"),
    )
    statuses = None if read is None else [s for s in read if s.name != NOTIFIER]
    recorder.set_notifier(None if read is None else next(s for s in read if s.name == NOTIFIER))
    recorder.set_projections(statuses)
    recorder.set_notification_queue(queue)
    recorder.set_model_snapshot(snapshot)
    body, content_type = recorder.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


def _check_metrics_token(request: web.Request, token: str) -> None:
    """RFC 6750 §2.1's header, compared in constant time; bytes, so that a header that is
    not ASCII is refused rather than raising."""
    sent = authorization_header(request, InvalidRequest) or ""
    scheme, _, given = sent.partition(" ")
    expected = token.encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), expected
    ):
        raise Unauthorized("a valid metrics token is required", realm="metrics", sent=bool(sent))
