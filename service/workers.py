"""`tollgate serve --workers N`: N service processes on one port (SO_REUSEPORT) and one
database. The parent starts the embedded PostgreSQL when there is one, applies the
schema, and forwards Ctrl-C / SIGTERM to the workers before stopping the database."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from types import FrameType

import structlog

from service.settings import Settings
from service.storage.database import apply_schema, create_pool, resolve_dsn
from service.web.server import dashboard_url, listen_url

log = structlog.get_logger(__name__)


async def _prepare(dsn: str) -> None:
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await apply_schema(conn)
    finally:
        await pool.close()


def serve_workers(settings: Settings, workers: int) -> int:
    dsn, embedded = resolve_dsn(settings)
    children: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(_prepare(dsn))
        env = {**os.environ, "DATABASE_URL": dsn, "TOLLGATE_REUSE_PORT": "1"}
        for _ in range(workers):
            children.append(subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env))
        log.info(
            "service.started",
            listen=listen_url(settings),
            dashboard=dashboard_url(settings),
            workers=workers,
        )

        stopping = False

        def forward(signum: int, _frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        # A worker that exits on its own is a failure: stop the others and say so, so the
        # supervisor (systemd, Kubernetes) restarts the whole service.
        while any(child.poll() is None for child in children):
            if not stopping and any(child.poll() is not None for child in children):
                log.error("workers.worker_exited", codes=[c.poll() for c in children])
                forward(signal.SIGTERM, None)
                stopping = False
                for child in children:
                    child.wait()
                return 1
            time.sleep(0.2)
        if stopping:
            return 0
        # Every worker ended between two looks, none asked to: a failure all the same.
        log.error("workers.worker_exited", codes=[c.poll() for c in children])
        return 1
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        if embedded is not None:
            embedded.stop()
