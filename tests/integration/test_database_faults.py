"""A database in trouble (stalled, read-only, refusing a statement) is a prompt 503 with
Retry-After on every route, and not-ready on /readyz: never a hang, never a 500."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from service.app import create_app
from service.settings import Settings
from service.storage.database import Database, create_pool
from service.web import sessions
from tests.conftest import Company, make_company
from tests.e2e.oauth_helpers import basic, new_app
from tests.e2e.test_make_run import free_port
from tests.integration.stall_proxy import StallProxy

BOUND = 2.0  # DB_TIMEOUT in these tests
READYZ_BOUND = 2.0  # ReadinessPolicy.timeout
SLACK = 2.5  # scheduling on a loaded 2-core machine (3.97 s seen); a hang never ends


@contextlib.asynccontextmanager
async def serving(dsn: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[TestClient]:
    """The service over aiohttp's real stack, its bounded pool on `dsn`, as `serve` opens it."""
    settings = Settings(
        data_dir=tmp_path, log_format="json", db_timeout=BOUND, db_connect_timeout=BOUND,
        **overrides,
    )  # fmt: skip
    pool = await create_pool(dsn, min_size=2, max_size=10, bound=BOUND, connect_timeout=BOUND)
    client = TestClient(TestServer(create_app(settings, database=Database(dsn, pool))))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await pool.close()


@contextlib.asynccontextmanager
async def through_proxy(db) -> AsyncIterator[StallProxy]:
    proxy = await StallProxy(db.dsn).start()
    try:
        yield proxy
    finally:
        proxy.resume()
        await proxy.close()


async def timed(call: Awaitable[ClientResponse]) -> tuple[ClientResponse, float]:
    started = time.monotonic()
    response = await asyncio.wait_for(call, 60)  # far beyond any bound: a hang fails here
    await response.read()
    return response, time.monotonic() - started


async def signed_in(client: TestClient, company: Company) -> str:
    creds = {"email": company.admin_email, "password": company.admin_password}
    response = await client.post("/session", json=creds)
    assert response.status == 200, await response.text()
    return response.cookies[sessions.COOKIE].value


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.2)


async def test_a_stalled_database_is_a_503_within_the_bound_on_every_route(db, tmp_path):
    async with through_proxy(db) as proxy, serving(proxy.proxied_dsn, tmp_path) as client:
        company = await make_company(client)
        app = await new_app(client, company)
        cookie = {"Cookie": f"{sessions.COOKIE}={await signed_in(client, company)}"}
        token_form = {"grant_type": "client_credentials"}
        creds = {"email": company.admin_email, "password": company.admin_password}
        calls = {
            "token": lambda: client.post(
                "/oauth/token",
                data=token_form,
                headers=basic(app["client_id"], app["client_secret"]),
            ),
            "admin": lambda: client.get(
                f"/admin/applications/{app['client_id']}", headers=company.auth
            ),
            "admin write": lambda: client.patch(
                f"/admin/applications/{app['client_id']}", json={"name": "x"}, headers=company.auth
            ),
            "session": lambda: client.post("/session", json=creds),
            "dashboard": lambda: client.get("/dashboard", headers=cookie),
            "events": lambda: client.get("/admin/events", headers=company.auth),
        }
        assert (await client.get("/readyz")).status == 200
        proxy.stall()  # as a frozen server (SIGSTOP) or a partition shows it
        with capture_logs() as logs:
            answers = {name: await timed(call()) for name, call in calls.items()}
        with capture_logs() as probe_logs:
            ready, ready_took = await timed(client.get("/readyz"))
        proxy.resume()

        async def token_again() -> bool:
            response = await calls["token"]()
            return response.status == 200

        await eventually(token_again)  # and it comes back by itself
    took = {name: round(elapsed, 2) for name, (_, elapsed) in answers.items()}
    print("answer times during the stall (s):", took, "readyz:", round(ready_took, 2))
    for name, (response, elapsed) in answers.items():
        assert response.status == 503, (name, response.status, await response.text())
        assert response.headers["Retry-After"].isdigit(), name
        assert (await response.json())["error"] == "temporarily_unavailable", name
        assert elapsed < BOUND + SLACK, (name, elapsed)
    assert ready.status == 503
    assert (await ready.json())["reasons"] == ["database unreachable"]
    assert ready_took < READYZ_BOUND + SLACK
    # one warning a probe, not one for each of its reads (a probe every second doubled them)
    said = [e["event"] for e in probe_logs if e["log_level"] == "warning"]
    assert said == ["ops.database_unreachable"], said
    assert any(e["event"] == "http.database_unavailable" for e in logs)
    assert not any(e["event"] == "http.unhandled_error" for e in logs)


STALENESS = 3.0  # POLICY_MAX_STALENESS in the next test


async def test_a_process_that_cannot_read_the_log_stops_deciding_tokens_once_its_view_is_too_old(
    db, tmp_path
):
    """The gateway decides from memory, so it goes on answering while the database is
    stalled, but only for POLICY_MAX_STALENESS: a token revoked through another process
    meanwhile is honoured here at most that long. Past it, a 503 within the bound, until
    the log can be read again."""
    async with (
        through_proxy(db) as proxy,
        serving(proxy.proxied_dsn, tmp_path, policy_max_staleness=STALENESS) as client,
    ):
        company = await make_company(client)
        app = await new_app(client, company)
        response = await client.post(
            "/oauth/token",
            data={"grant_type": "client_credentials"},
            headers=basic(app["client_id"], app["client_secret"]),
        )
        bearer = {"Authorization": f"Bearer {(await response.json())['access_token']}"}

        def whoami() -> Awaitable[ClientResponse]:
            return client.get("/api/v1/whoami", headers=bearer)

        assert (await whoami()).status == 200
        proxy.stall()
        stalled_at = time.monotonic()
        within_bound, _ = await timed(whoami())
        await asyncio.sleep(stalled_at + STALENESS + 0.5 - time.monotonic())
        with capture_logs() as logs:
            past_it, took = await timed(whoami())
        proxy.resume()

        async def decided_again() -> bool:
            return (await whoami()).status == 200

        await eventually(decided_again)
    assert within_bound.status == 200
    assert past_it.status == 503, await past_it.text()
    assert (await past_it.json())["error"] == "temporarily_unavailable"
    assert past_it.headers["Retry-After"].isdigit()
    assert took < BOUND + SLACK, took
    assert any(e["event"] == "http.database_unavailable" for e in logs)


async def test_start_up_against_a_server_that_never_answers_fails_in_time_with_a_reason(
    tmp_path,
):
    with socket.socket() as silent:  # accepts (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        env = {
            **os.environ,
            "DATABASE_URL": f"postgresql://tollgate@127.0.0.1:{port}/tollgate",
            "DB_CONNECT_TIMEOUT": "2",
            "DATA_DIR": str(tmp_path),
            "PORT": str(free_port()),
            "LOG_FORMAT": "json",
        }
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "serve", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            _, err = await asyncio.wait_for(process.communicate(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        took = time.monotonic() - started
    last = err.decode().strip().splitlines()[-1]
    assert process.returncode == 1
    assert "Traceback" not in err.decode()
    assert (
        last
        == "tollgate: cannot serve: the database did not answer within 2 s (DB_CONNECT_TIMEOUT)"
    )
    assert took < 2 + 10  # interpreter start-up and imports, then the bound


@contextlib.asynccontextmanager
async def read_only(db, pg_server) -> AsyncIterator[None]:
    """The test database made read-only for every new session, and its sessions ended so
    the service's connections come back read-only (as after a failover to a standby)."""
    admin = await asyncpg.connect(pg_server.admin_dsn)

    async def kick() -> None:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            db.name,
        )

    try:
        await admin.execute(f"ALTER DATABASE {db.name} SET default_transaction_read_only = on")
        await kick()
        yield
    finally:
        await admin.execute(f"ALTER DATABASE {db.name} RESET default_transaction_read_only")
        await kick()
        await admin.close()


async def refuses_writes(client: TestClient) -> bool:
    response = await client.get("/readyz")
    return (
        response.status == 503 and "database refuses writes" in (await response.json())["reasons"]
    )


async def test_a_read_only_database_refuses_writes_with_503_and_is_not_ready(
    db, pg_server, tmp_path
):
    async with serving(db.dsn, tmp_path) as client:
        company = await make_company(client)
        creds = {"email": company.admin_email, "password": company.admin_password}
        body = {
            "name": "App",
            "grant_type": "client_credentials",
            "ip_allowlist": ["10.0.0.1"],
            "permissions": ["invoices:read"],
            "notification_emails": ["ops@acme.example"],
        }
        async with read_only(db, pg_server):
            await eventually(lambda: refuses_writes(client))
            with capture_logs() as logs:
                created = await client.post("/admin/applications", json=body, headers=company.auth)
                login = await client.post("/session", json=creds)
                listed = await client.get("/admin/applications", headers=company.auth)
        assert created.status == 503, await created.text()
        assert login.status == 503, await login.text()
        assert login.headers["Retry-After"].isdigit()
        assert listed.status == 200  # reads still work

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await eventually(ready)
    assert not any(e["event"] == "http.unhandled_error" for e in logs)


async def test_a_service_starts_on_a_read_only_database_and_says_it_is_not_ready(
    db, pg_server, tmp_path
):
    """README: on a read-only endpoint /readyz says "database refuses writes". A start
    there (a restart after a failover to a standby) wrote its checkpoint rows even when
    they were all there, and stopped: "cannot execute INSERT in a read-only transaction"."""
    async with serving(db.dsn, tmp_path) as client:  # a first start makes its rows
        assert (await client.get("/healthz")).status == 200
    async with read_only(db, pg_server), serving(db.dsn, tmp_path) as client:
        await eventually(lambda: refuses_writes(client))
        assert (await client.get("/healthz")).status == 200


async def test_a_statement_the_database_cancels_is_a_503(db, pg_server, tmp_path):
    """A real QueryCanceledError (what statement_timeout raises too): the session insert
    waits on a lock held elsewhere, and the server cancels it."""
    async with serving(db.dsn, tmp_path) as client:
        company = await make_company(client)
        creds = {"email": company.admin_email, "password": company.admin_password}
        holder = await asyncpg.connect(db.dsn)
        admin = await asyncpg.connect(pg_server.admin_dsn)
        try:
            blocking = holder.transaction()
            await blocking.start()
            await holder.execute("LOCK TABLE web_sessions IN ACCESS EXCLUSIVE MODE")
            login = asyncio.ensure_future(client.post("/session", json=creds))
            waiting: list[int] = []

            async def a_backend_waits() -> bool:
                waiting[:] = (
                    await admin.fetchval(
                        "SELECT array_agg(pid) FROM pg_stat_activity "
                        "WHERE datname = $1 AND wait_event_type = 'Lock'",
                        db.name,
                    )
                    or []
                )
                return bool(waiting)

            await eventually(a_backend_waits, seconds=BOUND)
            await admin.execute("SELECT pg_cancel_backend(pid) FROM unnest($1::int[]) pid", waiting)
            response = await asyncio.wait_for(login, 30)
            await blocking.rollback()
        finally:
            await holder.close()
            await admin.close()
    assert response.status == 503, await response.text()
    assert response.headers["Retry-After"].isdigit()


async def test_a_statement_on_a_stalled_connection_gives_up_and_the_pool_recovers(db):
    """The statement times out after the bound; asyncpg then waits at most one more bound
    for the frozen server to acknowledge the cancellation, and drops the connection."""
    async with through_proxy(db) as proxy:
        pool = await create_pool(proxy.proxied_dsn, min_size=1, max_size=1, bound=BOUND)
        try:
            assert await pool.fetchval("SELECT 1") == 1  # an open, idle connection
            proxy.stall()
            started = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pool.fetchval("SELECT 1"), 60)
            took = time.monotonic() - started
            proxy.resume()
            assert await pool.fetchval("SELECT 2") == 2  # a new connection, at once
        finally:
            await pool.close()
    assert BOUND - 0.1 < took < 2 * BOUND + SLACK
