"""`tollgate serve` as real processes on chosen loopback addresses, for the tests of
several workers and several hosts on one database."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from service.commands.directory import create_company
from service.eventlog import Metadata
from service.runtime import open_context
from service.settings import Settings
from service.storage.database import Database


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Host:
    proc: subprocess.Popen[bytes]
    base: str
    data_dir: Path


@asynccontextmanager
async def serving(db, data_dir: Path, *args: str, host: str = "127.0.0.1", **env: str):
    """One `tollgate serve` (its own DATA_DIR, mail drop included) on `host`, answering
    /healthz before this yields; SIGTERM and a wait on the way out."""
    port = free_port(host)
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", *args],
        env={
            **os.environ,
            "DATABASE_URL": db.dsn,
            "HOST": host,
            "PORT": str(port),
            "DATA_DIR": str(data_dir),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "warning",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    base = f"http://{host}:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                try:
                    async with http.get(f"{base}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"{base} never answered /healthz")
        yield Host(proc, base, data_dir)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


async def admin_key(db, data_dir: Path) -> str:
    """A company made straight through the command handlers; its admin key."""
    settings = Settings(data_dir=data_dir)
    async with open_context(settings, database=Database(db.dsn, db.pool)) as ctx:
        made = await create_company(ctx, "Acme", "admin@acme.example", Metadata(actor="test"))
    return made.admin_key


async def new_application(base: str, key: str, **fields: object) -> dict:
    body = {
        "name": "Hosts",
        "grant_type": "client_credentials",
        "ip_allowlist": ["127.0.0.0/8"],
        "permissions": ["invoices:read"],
        "notification_emails": ["ops@acme.example"],
    } | fields
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/admin/applications", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        assert response.status == 201, await response.text()
        return await response.json()
