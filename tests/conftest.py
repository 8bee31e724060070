"""Test wiring: one PostgreSQL per test session (embedded, or TEST_DATABASE_URL), and a
fresh database cloned from a schema template for every test, so tests never see each
other's events."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from service.database import apply_schema, create_pool
from service.embedded import EmbeddedPostgres
from service.eventlog import EventLog

TEMPLATE = "tollgate_test_template"
_counter = itertools.count()


@dataclass
class Server:
    admin_dsn: str  # a maintenance database on the server (for CREATE DATABASE)

    def dsn(self, database: str) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield Server(url)
        return
    with tempfile.TemporaryDirectory(prefix="tollgate-test-") as tmp:
        embedded = EmbeddedPostgres(Path(tmp) / "pg", durable=False, max_connections=300)
        dsn = embedded.start()
        try:
            yield Server(dsn)
        finally:
            embedded.stop()


@pytest.fixture(scope="session")
async def template(pg_server: Server) -> str:
    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        await admin.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await admin.close()
    conn = await asyncpg.connect(pg_server.dsn(TEMPLATE))
    try:
        await apply_schema(conn)
    finally:
        await conn.close()
    return TEMPLATE


@dataclass
class TestDatabase:
    name: str
    dsn: str
    pool: asyncpg.Pool


@pytest.fixture
async def db(pg_server: Server, template: str) -> AsyncIterator[TestDatabase]:
    name = f"tollgate_t{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await admin.close()
    dsn = pg_server.dsn(name)
    pool = await create_pool(dsn, min_size=1, max_size=20)
    try:
        yield TestDatabase(name, dsn, pool)
    finally:
        await pool.close()
        admin = await asyncpg.connect(pg_server.admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


@pytest.fixture
async def eventlog(db: TestDatabase) -> AsyncIterator[EventLog]:
    log = EventLog(db.pool, db.dsn, poll_interval=0.2)
    await log.start()
    try:
        yield log
    finally:
        await log.close()
