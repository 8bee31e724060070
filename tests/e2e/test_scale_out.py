"""Several service processes, one database: what one process changes, every other one
enforces within a bounded delay."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager

import aiohttp
import psutil

from service.commands.directory import create_company
from service.eventlog import Metadata
from service.runtime import open_context
from service.settings import Settings
from service.storage.database import Database
from tests.e2e.oauth_helpers import basic
from tests.e2e.test_make_run import free_port


@asynccontextmanager
async def serving(db, *extra_args: str, **settings: str):
    """`tollgate serve` on `db`, with `settings` in its environment."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db.dsn,
        "PORT": str(port),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "warning",
        **settings,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", *extra_args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(base_url=base) as http:
            for _ in range(300):
                assert proc.poll() is None, proc.stderr.read().decode()
                try:
                    async with http.get("/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            yield http, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


async def a_company(db, tmp_path):
    async with open_context(Settings(data_dir=tmp_path), database=Database(db.dsn, db.pool)) as ctx:
        return await create_company(ctx, "Acme", "admin@acme.example", Metadata(actor="test"))


async def cc_app(http: aiohttp.ClientSession, company, name: str) -> dict:
    """A client_credentials application allowed from loopback, created through `http`."""
    async with http.post(
        "/admin/applications",
        headers={"Authorization": f"Bearer {company.admin_key}"},
        json={
            "name": name,
            "grant_type": "client_credentials",
            "ip_allowlist": ["127.0.0.1"],
            "permissions": ["invoices:read"],
            "notification_emails": ["ops@acme.example"],
        },
    ) as response:
        assert response.status == 201, await response.text()
        return await response.json()


async def until(predicate, seconds: float = 5.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        if await predicate():
            return time.perf_counter() - started
        await asyncio.sleep(0.002)
    raise AssertionError("the other process never caught up")


async def test_revocation_and_allow_list_changes_reach_the_other_process(db, tmp_path):
    company = await a_company(db, tmp_path)
    admin = {"Authorization": f"Bearer {company.admin_key}"}
    async with serving(db) as (a, _), serving(db) as (b, _):
        app = await cc_app(a, company, "Scale")
        creds = basic(app["client_id"], app["client_secret"])
        tokens = []
        for _ in range(2):
            async with b.post(
                "/oauth/token", data={"grant_type": "client_credentials"}, headers=creds
            ) as r:
                tokens.append((await r.json())["access_token"])
        for token in tokens:  # issued by B a moment ago, accepted by A at once
            async with a.get("/api/v1/whoami", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
        # revoke through A; B refuses it within a bounded delay
        async with a.post("/oauth/revoke", data={"token": tokens[0]}, headers=creds) as r:
            assert r.status == 200

        async def refused_by_b() -> bool:
            async with b.get(
                "/api/v1/whoami", headers={"Authorization": f"Bearer {tokens[0]}"}
            ) as r:
                return r.status == 401

        delay = await until(refused_by_b)
        assert delay < 2.0
        # narrow the allow list through A; B enforces it (403 and revocation)
        async with a.patch(
            f"/admin/applications/{app['client_id']}",
            headers=admin,
            json={"ip_allowlist": ["192.0.2.1"]},
        ) as r:
            assert r.status == 200

        async def forbidden_by_b() -> bool:
            async with b.get(
                "/api/v1/whoami", headers={"Authorization": f"Bearer {tokens[1]}"}
            ) as r:
                return r.status == 403

        await until(forbidden_by_b)
    assert await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'TokenRevoked'") == 2


async def test_serve_with_workers_shares_one_port(db):
    async with serving(db, "--workers", "2") as (http, proc):
        statuses = []
        for _ in range(20):
            async with http.get("/healthz") as r:
                statuses.append(r.status)
        assert statuses == [200] * 20
        children = psutil.Process(proc.pid).children()
        commands = sorted(c.cmdline()[3] for c in children)
        assert commands == ["projections", "serve", "serve"]
    assert proc.returncode == 0
