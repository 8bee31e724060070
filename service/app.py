"""create_app(settings): the database, the event log, the projections, middlewares, routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import structlog
from aiohttp import web

from projections.catalog import sql_projections
from projections.runner import ProjectionRunner
from service.database import Database, open_database
from service.eventlog import EventLog
from service.settings import Settings
from service.web.middleware import error_middleware, request_context_middleware
from service.web.ops import routes as ops_routes

log = structlog.get_logger(__name__)

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
EVENTLOG = web.AppKey("eventlog", EventLog)
RUNNER = web.AppKey("runner", ProjectionRunner)


def create_app(settings: Settings, *, database: Database | None = None) -> web.Application:
    """Build the application. `database` lets a caller (tests) hand in an open one."""
    app = web.Application(middlewares=[request_context_middleware, error_middleware])
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_database_ctx(database))
    app.cleanup_ctx.append(_eventlog_ctx)
    app.cleanup_ctx.append(_projections_ctx)
    app.add_routes(ops_routes)
    return app


def _database_ctx(given: Database | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        database = given or await open_database(app[SETTINGS], min_size=2)
        app[DATABASE] = database
        yield
        if given is None:
            await database.close()

    return ctx


async def _eventlog_ctx(app: web.Application) -> AsyncIterator[None]:
    database = app[DATABASE]
    eventlog = EventLog(database.pool, database.dsn)
    await eventlog.start()
    app[EVENTLOG] = eventlog
    yield
    await eventlog.close()


async def _projections_ctx(app: web.Application) -> AsyncIterator[None]:
    database = app[DATABASE]
    runner = ProjectionRunner(
        app[EVENTLOG],
        database.pool,
        database.dsn,
        sql_projections(),
        batch_size=app[SETTINGS].projection_batch_size,
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
