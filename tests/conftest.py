"""Test wiring: one PostgreSQL per test session (embedded, or TEST_DATABASE_URL), and a
fresh database cloned from a schema template for every test, so tests never see each
other's events."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import argon2
import asyncpg
import pytest
from aiohttp import test_utils

from service.domain import passwords
from service.eventlog import EventLog
from service.storage.database import apply_schema, create_pool
from service.storage.embedded import EmbeddedPostgres

TEMPLATE = "tollgate_test_template"
_counter = itertools.count()


async def _as_served(self: test_utils.BaseTestServer, **kwargs: object) -> object:
    """aiohttp's test server runs an application with handler_cancellation on: a handler
    whose client leaves is cancelled there, and not under `tollgate serve`, which hid a
    gateway request holding its upstream connection after its client left. Every test
    server runs its application as the service does (service/web/server.py's Runner)."""
    from service.web.server import Runner

    assert isinstance(self, test_utils.TestServer)
    return Runner(self.app, **{**kwargs, "handler_cancellation": False})


test_utils.TestServer._make_runner = _as_served  # type: ignore[method-assign]


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


#: argon2id at the least cost the algorithm allows (one pass over 8 KiB)
CHEAP_PASSWORDS = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture(scope="session", autouse=True)
def cheap_password_hashes() -> Iterator[None]:
    """Passwords hashed and checked in this process at argon2id's least cost: the same
    code, the same format, a different price. At the product's cost (`passwords.PROFILE`,
    about 0.12 s a hash here) each test's company cost a hash, and each sign-in a check.
    A hash records its own parameters, so a hash made at either cost verifies.
    The services the tests start as processes hash at the product's cost, and
    tests/integration/test_password_cost.py checks that cost in a process of its own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(passwords, "_hasher", CHEAP_PASSWORDS)
        patch.setattr(
            passwords, "DUMMY_HASH", passwords.hash_password(passwords.generate_password())
        )
        yield


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


#: what a lost connection to the server raises
_CONNECTION_LOST = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)


class Databases:
    """Fresh databases cloned from the template, made ahead of the tests that take them:
    a clone copies the template's catalogs (about 0.13 s of the server's CPU here), which
    the server then does while the previous test runs, on a core the test mostly leaves
    idle. Used ones are dropped the same way. Both run on the session's event loop, one
    statement at a time; `close` drops what was made and not taken."""

    AHEAD = 2
    #: the worker's own backend, while it has a connection
    admin_pid: int | None = None

    def __init__(self, server: Server, template: str) -> None:
        self._server = server
        self._template = template
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._used: list[str] = []
        self._wanted = asyncio.Event()
        self._closing = False
        self._worker = asyncio.create_task(self._work())
        self._wanted.set()

    async def take(self) -> str:
        # An empty queue means the worker is cloning (it waits only with AHEAD ready).
        get = asyncio.create_task(self._ready.get())
        # A failure to create one (the server down) ends the worker: raise it here.
        await asyncio.wait({get, self._worker}, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            self._worker.result()
            raise RuntimeError("the test databases' worker stopped")
        self._wanted.set()
        return get.result()

    def release(self, name: str) -> None:
        self._used.append(name)
        self._wanted.set()

    async def _work(self) -> None:
        admin: asyncpg.Connection | None = None
        broken = 0
        try:
            while not self._closing:
                await self._wanted.wait()
                self._wanted.clear()
                while not self._closing and (self._used or self._ready.qsize() < self.AHEAD):
                    try:
                        if admin is None:
                            admin = await asyncpg.connect(self._server.admin_dsn)
                            self.admin_pid = admin.get_server_pid()
                        await self._step(admin)
                        broken = 0
                    except _CONNECTION_LOST:
                        # A new connection, and the step again; a second loss in a row
                        # ends the worker, and `take` raises it.
                        broken += 1
                        if broken > 1:
                            raise
                        if admin is not None:
                            admin.terminate()
                        admin = None
        finally:
            if admin is not None:
                with contextlib.suppress(*_CONNECTION_LOST):
                    await admin.close()

    async def _step(self, admin: asyncpg.Connection) -> None:
        """One database made ahead, or one used one dropped."""
        if self._ready.qsize() < self.AHEAD:
            name = f"tollgate_t{os.getpid()}_{next(_counter)}"
            # Until it is ready, it is among those to drop (IF EXISTS): a connection lost
            # during the CREATE may or may not have made it.
            self._used.append(name)
            await admin.execute(f"CREATE DATABASE {name} TEMPLATE {self._template}")
            self._used.remove(name)
            self._ready.put_nowait(name)
        else:
            name = self._used[-1]
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            self._used.remove(name)

    async def close(self) -> None:
        # Not cancelled mid-statement: a CREATE DATABASE the server finishes after its
        # client gave up would leave a database nobody drops (on TEST_DATABASE_URL).
        self._closing = True
        self._wanted.set()
        with contextlib.suppress(Exception):
            await self._worker
        while not self._ready.empty():
            self._used.append(self._ready.get_nowait())
        admin = await asyncpg.connect(self._server.admin_dsn)
        try:
            for name in self._used:
                await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


@pytest.fixture(scope="session")
async def databases(pg_server: Server, template: str) -> AsyncIterator[Databases]:
    made = Databases(pg_server, template)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def db(pg_server: Server, databases: Databases) -> AsyncIterator[TestDatabase]:
    name = await databases.take()
    dsn = pg_server.dsn(name)
    pool = await create_pool(dsn, min_size=1, max_size=20)
    try:
        yield TestDatabase(name, dsn, pool)
    finally:
        await pool.close()
        databases.release(name)


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
