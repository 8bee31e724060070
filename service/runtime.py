"""Opening the service's parts outside the web server (the command line, tests)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from projections import snapshots
from projections.feed import MemoryFeed
from service.context import Context
from service.domain.permissions import load_catalogue
from service.eventlog import EventLog
from service.settings import Settings
from service.storage.database import Database, open_database


@contextlib.asynccontextmanager
async def open_context(
    settings: Settings, *, database: Database | None = None
) -> AsyncIterator[Context]:
    own = database is None
    db = database or await open_database(settings, min_size=1)
    eventlog = EventLog(db.pool)
    await eventlog.start()
    policy, directory = await snapshots.models(db.pool)
    feed = MemoryFeed(eventlog, [policy, directory])
    try:
        await feed.catch_up()
        yield Context(
            settings=settings,
            pool=db.pool,
            eventlog=eventlog,
            feed=feed,
            policy=policy,
            directory=directory,
            catalogue=load_catalogue(settings.permissions_file),
        )
    finally:
        await eventlog.close()
        if own:
            await db.close()
