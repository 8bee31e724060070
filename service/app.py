"""create_app(settings): the database, the event log, the projections, the routes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
import structlog
from aiohttp import web

from projections import snapshots
from projections.catalog import sql_projections
from projections.feed import MemoryFeed
from projections.runner import ProjectionRunner
from service.adapters import log_security_signals
from service.alerts import CoalescingLedger, running
from service.context import Context
from service.domain.permissions import load_catalogue
from service.domain.routes import load_routes
from service.eventlog import EventLog
from service.metrics import METRICS, Metrics
from service.notification.notifier import Notifier
from service.settings import Settings
from service.storage.database import Database, open_database
from service.storage.embedded import Supervisor
from service.storage.throttle import SignInThrottle
from service.web import openapi
from service.web.admin import routes as admin_routes
from service.web.authorize import routes as authorize_routes
from service.web.dashboard import TEMPLATES as DASHBOARD_TEMPLATES
from service.web.dashboard import routes as dashboard_routes
from service.web.dashboard import templates as dashboard_templates
from service.web.gateway import routes as gateway_routes
from service.web.history import routes as history_routes
from service.web.home import routes as home_routes
from service.web.keys import CONTEXT, ROUTES, SETTINGS, THROTTLE, UPSTREAM, Upstream
from service.web.login import routes as login_routes
from service.web.middleware import observed_routes, route_unmatched
from service.web.oauth import routes as oauth_routes
from service.web.ops import DATABASE_WATCH
from service.web.ops import routes as ops_routes
from service.web.policy_check import routes as policy_routes

log = structlog.get_logger(__name__)

__all__ = ["CONTEXT", "DATABASE", "EVENTLOG", "NOTIFIER", "RUNNER", "SETTINGS", "create_app"]

DATABASE = web.AppKey("database", Database)
EVENTLOG = web.AppKey("eventlog", EventLog)
RUNNER = web.AppKey("runner", ProjectionRunner)
NOTIFIER = web.AppKey("notifier", Notifier)
CATALOGUE = web.AppKey("catalogue", Mapping[str, str])
#: set when this process started the embedded PostgreSQL and keeps it up
SUPERVISOR = web.AppKey("supervisor", Supervisor)
SUPERVISING = web.AppKey("supervising", asyncio.Task[None])


def create_app(settings: Settings, *, database: Database | None = None) -> web.Application:
    """Build the application. `database` lets a caller (tests) hand in an open one."""
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_database_ctx(database))
    app.on_shutdown.append(_stop_supervising)
    app.cleanup_ctx.append(_eventlog_ctx)
    app.cleanup_ctx.append(_context_ctx)
    app.cleanup_ctx.append(_alerts_ctx)
    app.cleanup_ctx.append(_projections_ctx)
    app.cleanup_ctx.append(_notifier_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    # Read once, here: a bad PERMISSIONS_FILE or ROUTES_FILE stops the start at once.
    app[CATALOGUE] = load_catalogue(settings.permissions_file)
    app[ROUTES] = load_routes(settings.routes_file, app[CATALOGUE])
    app.add_routes(observed_routes(ops_routes))
    app.add_routes(observed_routes(home_routes))
    app.add_routes(observed_routes(login_routes))
    app.add_routes(observed_routes(oauth_routes))
    app.add_routes(observed_routes(authorize_routes))
    app.add_routes(observed_routes(admin_routes))
    app.add_routes(observed_routes(history_routes))
    app[DASHBOARD_TEMPLATES] = dashboard_templates()  # read once: a broken template stops the start
    app.add_routes(observed_routes(dashboard_routes))
    app.add_routes(observed_routes(policy_routes))
    app.add_routes(observed_routes(gateway_routes))
    openapi.setup(app)
    route_unmatched(app)  # last
    return app


async def _notifier_ctx(app: web.Application) -> AsyncIterator[None]:
    """IP-violation emails: one process sends them (advisory lock), the others stand by."""
    notifier = Notifier(app[CONTEXT], dsn=app[DATABASE].dsn)
    await notifier.start()
    app[NOTIFIER] = notifier
    yield
    await notifier.close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """One client session to the upstream API for the life of the process."""
    if app[SETTINGS].upstream_url is None:
        app[UPSTREAM] = Upstream()
        yield
        return
    session = aiohttp.ClientSession(
        auto_decompress=False,  # bodies pass through as the upstream encoded them
        # `connect` bounds the wait for one of the connector's connections as well: with
        # every one of them busy, a request gets 502 then, not a wait without end
        timeout=aiohttp.ClientTimeout(
            total=None, connect=10, sock_connect=5, sock_read=app[SETTINGS].upstream_timeout
        ),
        connector=aiohttp.TCPConnector(limit=256),
        # One session for every caller: a jar would keep the Set-Cookie one caller's
        # exchange brought and send it with every other caller's requests, over their own
        # (aiohttp's default jar does, for an upstream named by a host name)
        cookie_jar=aiohttp.DummyCookieJar(),
        # the caller's own, or none: aiohttp adds these to every request unless told not to
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
    )
    app[UPSTREAM] = Upstream(session)
    yield
    await session.close()


def _database_ctx(given: Database | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        database = given or await open_database(app[SETTINGS], min_size=2)
        app[DATABASE] = database
        task = None
        if database.embedded is not None:  # started here: nobody else restarts it
            app[DATABASE_WATCH] = database.embedded
            app[SUPERVISOR] = Supervisor(database.embedded)
            task = asyncio.create_task(_supervise(app[SUPERVISOR]), name="embedded-postgres")
            app[SUPERVISING] = task
        yield
        if task is not None:  # before the server stops, or the task would start it again
            await _stop_supervising(app)
        if given is None:
            await database.close()

    return ctx


async def _stop_supervising(app: web.Application) -> None:
    """On shutdown, first thing: the database goes down with the service (Ctrl-C reaches
    both), and must not be started again meanwhile."""
    task = app.get(SUPERVISING)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _supervise(supervisor: Supervisor, every: float = 2.0) -> None:
    """Restart the embedded PostgreSQL when it dies; once it cannot be, stop the service
    as SIGTERM does (the caller then exits non-zero, and its supervisor takes over)."""
    while True:
        await asyncio.sleep(every)
        if not await asyncio.to_thread(supervisor.check):
            os.kill(os.getpid(), signal.SIGTERM)
            return


async def _eventlog_ctx(app: web.Application) -> AsyncIterator[None]:
    database = app[DATABASE]
    eventlog = EventLog(database.pool, database.dsn, on_commit=app[METRICS].observe_append_batch)
    await eventlog.start()
    app[EVENTLOG] = eventlog
    yield
    await eventlog.close()


async def _context_ctx(app: web.Application) -> AsyncIterator[None]:
    """The in-memory models every decision reads, caught up before the first request."""
    settings = app[SETTINGS]
    policy, directory = await snapshots.models(app[DATABASE].pool)
    feed = MemoryFeed(app[EVENTLOG], [policy, directory])
    await feed.start()
    app[CONTEXT] = Context(
        settings=settings,
        pool=app[DATABASE].pool,
        eventlog=app[EVENTLOG],
        feed=feed,
        policy=policy,
        directory=directory,
        catalogue=app[CATALOGUE],
        metrics=app[METRICS],
        observers=[log_security_signals],
    )
    yield
    await feed.close()


async def _alerts_ctx(app: web.Application) -> AsyncIterator[None]:
    """Refused attempts that can be repeated for ever are coalesced (service/alerts.py):
    everything that records through the context's ledger goes through the coalescer. And
    failed sign-ins are counted where every process sees them: per address and caller,
    5 in 15 minutes; per address from anywhere, 20."""
    ctx, settings = app[CONTEXT], app[SETTINGS]
    observers = [log_security_signals, app[METRICS].observe_recorded]
    ledger = CoalescingLedger(ctx.ledger, settings.violation_window, time.time, observers)
    ctx.ledger = ctx.token_endpoint.ledger = ledger
    app[THROTTLE] = SignInThrottle(ctx.pool, limit=5, window=900)
    async with running(ledger):
        yield


async def _projections_ctx(app: web.Application) -> AsyncIterator[None]:
    database = app[DATABASE]
    runner = ProjectionRunner(
        app[EVENTLOG],
        database.pool,
        database.dsn,
        sql_projections(),
        batch_size=app[SETTINGS].projection_batch_size,
        moved=app[METRICS].projection_moved,
        snapshots=snapshots.writer(app[EVENTLOG], database, app[SETTINGS].model_snapshot_every),
    )
    await runner.ensure_checkpoints()
    app[RUNNER] = runner
    task = None
    if app[SETTINGS].run_projections:
        task = asyncio.create_task(runner.run_forever(), name="projections")
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
