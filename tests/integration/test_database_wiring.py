"""The tests' own wiring: the worker that clones each test's database ahead
(tests/conftest.py, `Databases`) carries on when its connection to the server is lost."""

from __future__ import annotations

import asyncpg


async def test_the_database_worker_reconnects_when_its_connection_is_lost(
    pg_server, databases
) -> None:
    admin = await asyncpg.connect(pg_server.admin_dsn)
    taken: list[str] = []
    try:
        lost = databases.admin_pid
        assert lost is not None
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", lost)
        # More than it holds ahead: the worker has to clone again after the loss.
        for _ in range(databases.AHEAD + 1):
            taken.append(await databases.take())
        assert databases.admin_pid not in (None, lost)
        found = await admin.fetch("SELECT datname FROM pg_database WHERE datname = any($1)", taken)
        assert sorted(r["datname"] for r in found) == sorted(taken)
        assert len(set(taken)) == len(taken)
    finally:
        for name in taken:
            databases.release(name)
        await admin.close()
