"""`make run` on the embedded database: it starts, answers /healthz, keeps its data across
runs, and Ctrl-C stops the service and the database cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import aiohttp
import asyncpg

from service import events as ev
from service.eventlog import EventLog
from service.storage.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_healthy(port: int, proc: subprocess.Popen, seconds: float = 60) -> dict:
    async with aiohttp.ClientSession() as http:
        for _ in range(int(seconds * 10)):
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    if response.status == 200:
                        return await response.json()
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the service never answered /healthz")


def make_run(data_dir: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "MAKEFLAGS"}}
    env.update(DATA_DIR=str(data_dir), PORT=str(port), LOG_FORMAT="json")
    # its own process group, so the test can press Ctrl-C on the whole of it, as a terminal does
    return subprocess.Popen(
        ["make", "--no-print-directory", "-C", str(ROOT), "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def logged_events(log: str) -> list[str]:
    """The `event` of every JSON log line."""
    events = []
    for line in log.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line).get("event"))
    return events


def ctrl_c(proc: subprocess.Popen) -> str:
    """Press Ctrl-C; return the service's log once make (killed by SIGINT, as at a
    terminal) and the service under it have exited."""
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(30)
    log = proc.stderr.read().decode()
    assert code in (0, -signal.SIGINT), log
    return log


async def test_make_run_serves_on_the_embedded_database_and_keeps_its_data(tmp_path):
    data_dir = tmp_path / "data"
    port = free_port()
    pgdata = data_dir / "postgres"

    first = make_run(data_dir, port)
    try:
        assert await wait_healthy(port, first) == {"status": "ok"}
        dsn = EmbeddedPostgres(pgdata).dsn()
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        log = EventLog(pool)
        await log.start()
        await log.append("company-keep", 0, [ev.CompanyCreated(company_id="keep", name="Kept")])
        await log.close()
        await pool.close()
    finally:
        log = ctrl_c(first)
    assert "embedded_postgres.stopped" in logged_events(log)
    assert "Traceback" not in log
    assert not (pgdata / "postmaster.pid").exists()  # the database stopped with it

    second = make_run(data_dir, port)
    try:
        await wait_healthy(port, second)
        conn = await asyncpg.connect(EmbeddedPostgres(pgdata).dsn())
        try:
            assert (
                await conn.fetchval("SELECT count(*) FROM events WHERE stream_id = 'company-keep'")
                == 1
            )
        finally:
            await conn.close()
    finally:
        log = ctrl_c(second)
    assert "embedded_postgres.started" in log
    assert "Traceback" not in log
    assert not (pgdata / "postmaster.pid").exists()
