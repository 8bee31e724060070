"""Builders of realistic event histories for tests and benchmarks."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time

import asyncpg

from service import events as ev
from service.eventlog import EventLog, Metadata

PERMISSIONS = ["invoices:read", "invoices:write", "customers:read", "payments:read"]


def digest(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def application(
    company_id: str, n: int, grant: str = "client_credentials"
) -> ev.ApplicationCreated:
    return ev.ApplicationCreated(
        company_id=company_id,
        client_id=f"{company_id}-app{n}",
        name=f"App {n}",
        grant_type=grant,
        redirect_uri="https://example.com/cb" if grant == "authorization_code" else None,
        ip_allowlist=["192.0.2.0/24"],
        permissions=list(PERMISSIONS),
        notification_emails=["ops@example.com"],
        secret_hash=digest("secret", company_id, n),
    )


def token(
    app: ev.ApplicationCreated, n: int, *, expires_in: int | None = None
) -> ev.AccessTokenIssued:
    now = int(time.time())
    return ev.AccessTokenIssued(
        company_id=app.company_id,
        client_id=app.client_id,
        family_id=f"fam-{app.client_id}-{n}",
        grant_type=app.grant_type,
        token_hash=digest("token", app.client_id, n),
        permissions=list(app.permissions),
        issued_at=now,
        expires_at=None if expires_in is None else now + expires_in,
        refresh_token_hash=None if expires_in is None else digest("refresh", app.client_id, n),
    )


async def populate(eventlog: EventLog, tokens: int, *, seed: int = 7, chunk: int = 500) -> int:
    """Companies, applications, then `tokens` token families with revocations, permission
    changes, a deleted application and a revoked connection mixed in. Returns the head."""
    rng = random.Random(seed)
    meta = Metadata(actor="system", request_id="populate")
    apps: list[ev.ApplicationCreated] = []
    for c in range(3):
        company_id = f"co{c}"
        await eventlog.append(
            f"company-{company_id}",
            0,
            [ev.CompanyCreated(company_id=company_id, name=f"Co {c}")],
            meta,
        )
        for a in range(4):
            app = application(
                company_id, a, "authorization_code" if a % 2 else "client_credentials"
            )
            await eventlog.append(f"application-{app.client_id}", 0, [app], meta)
            apps.append(app)
    versions = {app.client_id: 1 for app in apps}
    issued: list[ev.AccessTokenIssued] = []

    async def app_event(app: ev.ApplicationCreated, event: ev.Event) -> None:
        await eventlog.append(
            f"application-{app.client_id}", versions[app.client_id], [event], meta
        )
        versions[app.client_id] += 1

    for start in range(0, tokens, chunk):
        writes = []
        for n in range(start, min(tokens, start + chunk)):
            app = rng.choice(apps)
            tok = token(app, n, expires_in=7200 if app.grant_type == "authorization_code" else None)
            issued.append(tok)
            writes.append(eventlog.append(f"token-{tok.family_id}", 0, [tok], meta))
        await asyncio.gather(*writes)
        revokes = []
        for tok in rng.sample(issued[start:], k=min(len(issued[start:]), chunk // 10)):
            revoke = ev.TokenRevoked(
                company_id=tok.company_id,
                client_id=tok.client_id,
                family_id=tok.family_id,
                reason="client_request",
            )
            revokes.append(eventlog.append(f"token-{tok.family_id}", 1, [revoke], meta))
        await asyncio.gather(*revokes)
        app = rng.choice(apps)
        before = list(PERMISSIONS)
        after = rng.sample(before, k=3)
        await app_event(
            app,
            ev.PermissionsChanged(
                company_id=app.company_id, client_id=app.client_id, before=before, after=after
            ),
        )
        await app_event(
            app,
            ev.PermissionsChanged(
                company_id=app.company_id, client_id=app.client_id, before=after, after=before
            ),
        )
        await app_event(
            app,
            ev.IpAllowlistChanged(
                company_id=app.company_id,
                client_id=app.client_id,
                before=["192.0.2.0/24"],
                after=["192.0.2.0/24"],
            ),
        )
    doomed = apps[-1]
    await app_event(
        doomed, ev.ApplicationDeleted(company_id=doomed.company_id, client_id=doomed.client_id)
    )
    connection = apps[1]
    await eventlog.append(
        f"connection-{connection.company_id}-{connection.client_id}",
        None,
        [
            ev.ConnectionRevoked(
                company_id=connection.company_id,
                client_id=connection.client_id,
                reason="admin_request",
            )
        ],
        meta,
    )
    return await eventlog.head()


async def tampered(pool: asyncpg.Pool, sql: str) -> None:
    """`sql` run on the log as someone with superuser rights could: past its append-only
    trigger."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(sql)


async def cut_tail(pool: asyncpg.Pool, after: int) -> None:
    """The log's tail deleted: the chain left is intact, shorter."""
    await tampered(pool, f"DELETE FROM events WHERE position > {after}")


async def companies(eventlog: EventLog, prefix: str, count: int) -> None:
    """`count` companies, one event each: `prefix`0, `prefix`1, ..."""
    for n in range(count):
        event = ev.CompanyCreated(company_id=f"{prefix}{n}", name=prefix.upper())
        await eventlog.append(f"company-{prefix}{n}", 0, [event])
