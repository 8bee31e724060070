"""`tollgate serve` as a real process for the fault tests: its own port, DATA_DIR and log
file (a pipe would fill up under load and stall the service), and the processes under it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from service.storage.embedded import EmbeddedPostgres


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    proc: subprocess.Popen
    port: int
    data_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://{self.env.get('HOST', '127.0.0.1')}:{self.port}"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    def embedded_dsn(self) -> str:
        return EmbeddedPostgres(self.pgdata).dsn()

    def postmaster_pid(self) -> int:
        return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict]:
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def logged(self, event: str) -> list[dict]:
        return [e for e in self.events() if e.get("event") == event]

    def children(self) -> list[psutil.Process]:
        """Every process the parent of `--workers N` started: its workers and the one that
        runs the SQL projections."""
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> list[psutil.Process]:
        """The processes that serve the port."""
        return [c for c in self.children() if _runs(c, "serve")]

    def projections(self) -> list[psutil.Process]:
        return [c for c in self.children() if _runs(c, "projections")]

    async def healthz(self, http: aiohttp.ClientSession) -> int | None:
        try:
            async with http.get(
                f"{self.base}/healthz", timeout=aiohttp.ClientTimeout(total=5)
            ) as r:
                return r.status
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def wait_listening(self, workers: int, seconds: float = 60) -> None:
        """Until every worker listens (one that is still starting when the database dies
        fails its start, and the parent stops the service for it)."""
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            listening = 0
            for worker in self.workers():
                with contextlib.suppress(psutil.Error):
                    if any(
                        c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                        for c in worker.net_connections(kind="tcp")
                    ):
                        listening += 1
            if listening == workers:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{workers} workers never listened:\n{self.log()[-3000:]}")

    async def healthz_now(self) -> int | None:
        async with aiohttp.ClientSession() as http:
            return await self.healthz(http)

    async def wait_status(self, status: int, seconds: float = 60) -> float:
        """Until /healthz answers `status`; how long that took."""
        started = time.monotonic()
        async with aiohttp.ClientSession() as http:
            while time.monotonic() - started < seconds:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"the service exited ({self.proc.returncode}):\n{self.log()[-3000:]}"
                    )
                if await self.healthz(http) == status:
                    return time.monotonic() - started
                await asyncio.sleep(0.05)
        raise AssertionError(
            f"/healthz never answered {status} in {seconds} s:\n{self.log()[-3000:]}"
        )

    def stop(self, seconds: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


def start(
    data_dir: Path,
    *args: str,
    port: int | None = None,
    log_name: str = "service.log",
    prefix: tuple[str, ...] = (),
    **env: str,
) -> Service:
    """`tollgate serve *args` on DATA_DIR (the embedded PostgreSQL unless DATABASE_URL is
    given) in a session of its own, so that the test can signal all of it; `prefix` runs
    it through another command (`ip netns exec NAME`, which becomes the service)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    full_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    full_env.update(DATA_DIR=str(data_dir), PORT=str(port), LOG_FORMAT="json", LOG_LEVEL="warning")
    full_env.update(env)
    log_path = data_dir.parent / f"{data_dir.name}-{log_name}"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "service", "serve", *args],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(proc, port, data_dir, log_path, env)


def kill_everything(service: Service) -> None:
    """What a test leaves behind must not outlive it: the service's session, its workers,
    and the embedded PostgreSQL (which pg_ctl starts in a session of its own)."""
    for child in service.children():
        child.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(service.proc.pid, signal.SIGKILL)
    if service.proc.poll() is None:
        service.proc.wait(10)
    try:
        postmaster = psutil.Process(service.postmaster_pid())
        postmaster.send_signal(signal.SIGCONT)  # a stalled one could not act on the next
        postmaster.send_signal(signal.SIGQUIT)  # PostgreSQL's immediate shutdown
        postmaster.wait(30)
    except (OSError, ValueError, psutil.Error):
        pass


def _runs(process: psutil.Process, command: str) -> bool:
    """Whether `process` is `python -m service <command> ...`."""
    try:
        argv = process.cmdline()
    except psutil.Error:
        return False
    return argv[2:4] == ["service", command]
