"""Load from concurrent clients (bounded in count and time, loopback only) and the checks
that follow every fault: each acknowledged write is in the log and usable, the hash chain
verifies, and each SQL projection equals a rebuild."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg

from service.storage.embedded import EmbeddedPostgres
from tests.e2e.oauth_helpers import basic
from tests.faults.process import Service

#: the service as the fault tests run it: the clients' load is not throttled, and every
#: acknowledged token stays live (none superseded) so that each can be checked
FAULT_ENV = {"TOKEN_RATE_PER_CLIENT": "0", "CC_TOKEN_LIMIT": "1000000"}
#: every answer must come within this, whatever the fault (a hang fails the test)
ANSWER_BOUND = 30.0


@dataclass
class Tally:
    """What the clients saw: the writes the service acknowledged, and how it answered."""

    tokens: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # acknowledged renames
    statuses: Counter[int | str] = field(default_factory=Counter)
    longest: float = 0.0

    def saw(self, status: int | str, elapsed: float) -> None:
        self.statuses[status] += 1
        self.longest = max(self.longest, elapsed)


@dataclass
class Tenant:
    company: dict[str, Any]
    application: dict[str, Any]

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.company['admin_key']}"}

    @property
    def credentials(self) -> dict[str, str]:
        return basic(self.application["client_id"], self.application["client_secret"])


def cli(service: Service, *args: str, dsn: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATA_DIR": str(service.data_dir), "LOG_FORMAT": "json"}
    env["DATABASE_URL"] = dsn or service.env.get("DATABASE_URL") or service.embedded_dsn()
    return subprocess.run(
        [sys.executable, "-m", "service", *args], env=env, capture_output=True, timeout=120
    )


async def tenant(service: Service, name: str = "Acme", **fields: Any) -> Tenant:
    made = await asyncio.to_thread(
        cli, service, "company", "create", name, "--admin-email", f"admin@{name.lower()}.example"
    )
    assert made.returncode == 0, made.stderr.decode()
    company = json.loads(made.stdout)
    body = {
        "name": f"{name} load",
        "grant_type": "client_credentials",
        "ip_allowlist": ["127.0.0.1"],
        "permissions": ["invoices:read"],
        "notification_emails": [f"ops@{name.lower()}.example"],
        **fields,
    }
    headers = {"Authorization": f"Bearer {company['admin_key']}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{service.base}/admin/applications", json=body, headers=headers) as r,
    ):
        assert r.status == 201, await r.text()
        return Tenant(company, await r.json())


async def _timed(tally: Tally, request: Any) -> tuple[int | None, Any]:
    started = time.monotonic()
    try:
        async with request as response:
            body = await response.json(content_type=None) if response.status < 500 else None
            tally.saw(response.status, time.monotonic() - started)
            return response.status, body
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        # Refused while the service restarts, cut while it dies: seen, never acknowledged.
        tally.saw(type(exc).__name__, time.monotonic() - started)
        return None, None


async def load(
    base: str, who: Tenant, *, seconds: float, clients: int = 6, requests: int = 400
) -> Tally:
    """`clients` token clients and one admin client, each making at most `requests`
    requests spread over `seconds`."""
    tally = Tally()
    deadline = time.monotonic() + seconds
    pace = seconds / requests
    timeout = aiohttp.ClientTimeout(total=ANSWER_BOUND)

    async def tokens(http: aiohttp.ClientSession) -> None:
        for _ in range(requests):
            if time.monotonic() > deadline:
                return
            form = {"grant_type": "client_credentials"}
            post = http.post(f"{base}/oauth/token", data=form, headers=who.credentials)
            status, body = await _timed(tally, post)
            if status == 200:
                tally.tokens.append(body["access_token"])
            # paced, so that the load spans the fault rather than ending before it
            await asyncio.sleep(pace if status else max(pace, 0.05))

    async def renames(http: aiohttp.ClientSession) -> None:
        url = f"{base}/admin/applications/{who.application['client_id']}"
        run = secrets.token_hex(3)  # names unique across loads: each rename is an event
        for n in range(requests):
            if time.monotonic() > deadline:
                return
            name = f"Renamed {run} {n}"
            status, _ = await _timed(tally, http.patch(url, json={"name": name}, headers=who.admin))
            if status == 200:
                tally.names.append(name)
            await asyncio.sleep(pace if status else max(pace, 0.05))

    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(tokens(http) for _ in range(clients)), renames(http))
    return tally


async def usable_at_the_gateway(base: str, tokens: list[str]) -> None:
    """Every acknowledged token works at the gateway (checked 16 at a time)."""
    async with aiohttp.ClientSession() as http:
        gate = asyncio.Semaphore(16)

        async def one(token: str) -> int:
            async with (
                gate,
                http.get(
                    f"{base}/api/v1/whoami", headers={"Authorization": f"Bearer {token}"}
                ) as r,
            ):
                return r.status

        statuses = await asyncio.gather(*(one(t) for t in tokens))
    assert Counter(statuses) == Counter({200: len(tokens)})


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def check_the_log(service: Service, tally: Tally) -> dict[str, Any]:
    """With the service stopped: the acknowledged writes are in the log, the chain
    verifies, and each SQL projection equals a rebuild. Returns figures for the report."""
    server = EmbeddedPostgres(service.pgdata)
    dsn = await asyncio.to_thread(server.start)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            logged = {
                r["h"]
                for r in await conn.fetch(
                    "SELECT payload->>'token_hash' AS h FROM events"
                    " WHERE type IN ('AccessTokenIssued', 'TokenRefreshed')"
                )
            }
            renamed = {
                r["n"]
                for r in await conn.fetch(
                    "SELECT payload->>'after' AS n FROM events WHERE type = 'ApplicationRenamed'"
                )
            }
        finally:
            await conn.close()
        missing = [t for t in tally.tokens if digest(t) not in logged]
        assert not missing, f"{len(missing)} acknowledged tokens are not in the log"
        assert set(tally.names) <= renamed, set(tally.names) - renamed
        verified = await asyncio.to_thread(cli, service, "audit", "verify", dsn=dsn)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert json.loads(verified.stdout)["ok"] is True
        await projections_equal_a_rebuild(service, dsn)
        return {"tokens": len(tally.tokens), "renames": len(tally.names)}
    finally:
        await asyncio.to_thread(server.stop)


PROJECTION_TABLES = (
    "applications",
    "companies",
    "users",
    "admin_keys",
    "live_tokens",
    "event_stats",
)


async def _snapshot(dsn: str) -> dict[str, list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            table: sorted(
                json.dumps(dict(r), default=str, sort_keys=True)
                for r in await conn.fetch(f"SELECT * FROM {table}")
            )
            for table in PROJECTION_TABLES
        }
    finally:
        await conn.close()


async def projections_equal_a_rebuild(service: Service, dsn: str) -> None:
    caught_up = await asyncio.to_thread(
        cli, service, "projections", "run", "--until-caught-up", dsn=dsn
    )
    assert caught_up.returncode == 0, caught_up.stderr.decode()
    before = await _snapshot(dsn)
    rebuilt = await asyncio.to_thread(cli, service, "projections", "rebuild", dsn=dsn)
    assert rebuilt.returncode == 0, rebuilt.stderr.decode()
    after = await _snapshot(dsn)
    for table in PROJECTION_TABLES:
        assert before[table] == after[table], f"{table} differs from its rebuild"
