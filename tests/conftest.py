"""Test wiring: one PostgreSQL per test session (embedded, or TEST_DATABASE_URL), and a
fresh database cloned from a schema template for every test, so tests never see each
other's events."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from service.eventlog import EventLog
from service.storage.database import apply_schema, create_pool
from service.storage.embedded import EmbeddedPostgres

TEMPLATE = "tollgate_test_template"
_counter = itertools.count()


@dataclass
class Server:
    admin_dsn: str  # a maintenance database on the server (for CREATE DATABASE)

    def dsn(self, database: str) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path=f"/{database}"))


#: the pid of the test session that started the server in a tollgate-test-* folder
OWNER = "owner"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphans(tmp: Path) -> list[Path]:
    """Stop the embedded servers of test sessions that were killed before they could stop
    them (each holds its shared buffers until the machine restarts), and remove their
    folders. A folder whose session is alive, or whose owner is unknown, is left alone."""
    reaped = []
    for folder in tmp.glob("tollgate-test-*"):
        try:
            owner = int((folder / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        try:
            postmaster = int((folder / "pg" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            postmaster = None
        if postmaster is not None and _alive(postmaster):
            os.kill(postmaster, signal.SIGQUIT)  # immediate shutdown: nothing there to keep
        shutil.rmtree(folder, ignore_errors=True)
        reaped.append(folder)
    return reaped


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield Server(url)
        return
    reap_orphans(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix="tollgate-test-") as tmp:
        (Path(tmp) / OWNER).write_text(str(os.getpid()))
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


# --- the service over HTTP -------------------------------------------------------------

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from service.app import CONTEXT, create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.storage.database import Database  # noqa: E402


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, log_format="json", run_projections=True)


@pytest.fixture
async def client(db: TestDatabase, settings: Settings) -> AsyncIterator[TestClient]:
    app = create_app(settings, database=Database(db.dsn, db.pool))
    test_client = TestClient(TestServer(app, host="127.0.0.1"))
    await test_client.start_server()
    try:
        yield test_client
    finally:
        await test_client.close()


@dataclass
class Company:
    company_id: str
    admin_key: str
    admin_email: str
    admin_password: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}


async def make_company(client: TestClient, name: str = "Acme") -> Company:
    from service.commands.directory import create_company
    from service.eventlog import Metadata

    ctx = client.app[CONTEXT]
    email = f"admin-{next(_counter)}@{name.lower().replace(' ', '')}.example"
    made = await create_company(ctx, name, email, Metadata(actor="test"))
    return Company(made.company_id, made.admin_key, made.admin_email, made.admin_password)


@pytest.fixture
async def company(client: TestClient) -> Company:
    return await make_company(client, "Acme")


@pytest.fixture
async def other_company(client: TestClient) -> Company:
    return await make_company(client, "Globex")
