"""Slow or numerous clients cannot take the service down: against a real `tollgate serve`,
hundreds of connections trickling their request keep nobody else waiting, and each is
closed once BODY_TIMEOUT has passed; past MAX_CONNECTIONS a connection is refused at once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from service.commands.directory import create_company
from service.eventlog import Metadata
from service.runtime import open_context
from service.settings import Settings
from service.storage.database import Database
from tests.e2e.oauth_helpers import basic
from tests.e2e.test_make_run import free_port

BODY_TIMEOUT = 3
SLOW = 300  # connections in the flood (loopback only)


@asynccontextmanager
async def serving(db, **env: str) -> AsyncIterator[tuple[aiohttp.ClientSession, int]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve"],
        env={**os.environ, "DATABASE_URL": db.dsn, "PORT": str(port), "LOG_FORMAT": "json",
             "LOG_LEVEL": "warning", "BODY_TIMEOUT": str(BODY_TIMEOUT), **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(600):
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                try:
                    async with http.get("/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            yield http, port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


async def an_application(db, tmp_path, http: aiohttp.ClientSession) -> dict[str, str]:
    settings = Settings(data_dir=tmp_path)
    async with open_context(settings, database=Database(db.dsn, db.pool)) as ctx:
        company = await create_company(ctx, "Acme", "admin@acme.example", Metadata(actor="t"))
    body = {"name": "App", "grant_type": "client_credentials", "ip_allowlist": ["127.0.0.1"],
            "permissions": ["invoices:read"], "notification_emails": ["ops@acme.example"]}  # fmt: skip
    auth = {"Authorization": f"Bearer {company.admin_key}"}
    async with http.post("/admin/applications", json=body, headers=auth) as response:
        assert response.status == 201, await response.text()
        return await response.json()


class Trickler:
    """One connection sending its request a byte a second: the body (headers complete)
    or the headers themselves."""

    def __init__(self, port: int, *, headers_too: bool) -> None:
        self.port = port
        self.headers_too = headers_too
        self.opened = 0.0
        self.closed_after: float | None = None
        self.answer = b""

    async def run(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.opened = time.monotonic()
        head = (
            b"POST /oauth/token HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
        )
        trickle = head + b"g" * 1000 if self.headers_too else b"g" * 1000
        if not self.headers_too:
            writer.write(head)
        sender = asyncio.create_task(self._send(writer, trickle))
        try:
            self.answer = await asyncio.wait_for(reader.read(), 60)  # until the server closes
            self.closed_after = time.monotonic() - self.opened
        finally:
            sender.cancel()
            writer.transport.abort()

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        try:
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await asyncio.sleep(1)
        except (ConnectionError, RuntimeError):
            pass


async def test_a_slow_body_flood_leaves_the_service_answering_and_is_closed_in_time(db, tmp_path):
    async with serving(db) as (http, port):
        app = await an_application(db, tmp_path, http)
        tricklers = [Trickler(port, headers_too=i % 3 == 0) for i in range(SLOW)]
        flood = [asyncio.create_task(t.run()) for t in tricklers]
        try:
            await asyncio.sleep(1)  # all of them open and trickling
            answered = []
            for _ in range(3):
                started = time.monotonic()
                async with http.get("/healthz") as health:
                    health_status = health.status
                form = {"grant_type": "client_credentials"}
                creds = basic(app["client_id"], app["client_secret"])
                async with http.post("/oauth/token", data=form, headers=creds) as token:
                    token_status = token.status
                answered.append((health_status, token_status, time.monotonic() - started))
            await asyncio.wait_for(asyncio.gather(*flood), 60)
        finally:
            for task in flood:
                task.cancel()
    assert all(h == 200 and t == 200 and took < 5 for h, t, took in answered), answered
    closed = [t.closed_after for t in tricklers]
    assert all(c is not None and c < BODY_TIMEOUT + 3 for c in closed), max(
        c or 999 for c in closed
    )
    assert all(t.answer.startswith(b"HTTP/1.1 408 ") for t in tricklers)
    assert all(b'"error":"invalid_request"' in t.answer for t in tricklers)


async def test_connections_past_the_limit_are_refused_at_once(db):
    async with serving(db, MAX_CONNECTIONS="20") as (http, port):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        refused = await asyncio.wait_for(reader.read(), 10)
        took = time.monotonic() - started
        writer.close()
        for _, held_writer in held:
            held_writer.transport.abort()

        async def healthy() -> bool:
            try:
                async with http.get("/healthz") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        deadline = time.monotonic() + 10
        while not await healthy():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert b"Retry-After: 2" in refused
    assert took < 2


async def test_idle_keep_alive_connections_make_room_for_new_clients(db):
    """At MAX_CONNECTIONS, connections idle between keep-alive requests (27 requests a
    second would hold 2,000 of them forever) give way to a new client: the oldest idle one
    is closed, as keep-alive allows at any time (RFC 9112 §9.3)."""
    async with serving(db, MAX_CONNECTIONS="5") as (_http, port):

        async def keep_alive_client() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if head.startswith(b"HTTP/1.1 200 "):
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
            return reader, writer, head

        idle = [await keep_alive_client() for _ in range(5)]
        newer = [await keep_alive_client() for _ in range(3)]  # each needs a place
        answers = [head for _, _, head in newer]
        closed = 0
        for reader, writer, _ in idle:
            try:  # an evicted one has its end of file already: the others say nothing
                closed += await asyncio.wait_for(reader.read(), 2) == b""
            except ConnectionError:
                closed += 1
            except TimeoutError:
                pass  # still open, idle
            writer.close()
        for _, writer, _ in newer:
            writer.close()
    assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers), answers
    assert closed == 3
