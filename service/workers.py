"""`tollgate serve --workers N`: N service processes on one port (SO_REUSEPORT) and one
database, and one process that runs the SQL projections. The parent claims the port (a
lock under DATA_DIR that its workers inherit), starts the embedded PostgreSQL when there is
one and keeps it up, applies the schema, and forwards Ctrl-C / SIGTERM to its children
before stopping the database. Its children die with it: nothing of an old generation
keeps serving beside a new one."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO

import structlog
from aiohttp import web

from service.metrics import MULTIPROCESS_DIR, fresh_multiprocess_dir
from service.settings import Settings
from service.storage.database import apply_schema, create_pool, resolve_dsn
from service.storage.embedded import EmbeddedPostgres, Supervisor
from service.web.ops import DATABASE_WATCH
from service.web.server import dashboard_url, issuer_guessed, listen_url, stop_signals

log = structlog.get_logger(__name__)

#: what a worker is told by its parent: who it must die with, and which database to watch
PARENT_PID = "TOLLGATE_PARENT_PID"
EMBEDDED_PGDATA = "TOLLGATE_EMBEDDED_PGDATA"
PORT_LOCK_FD = "TOLLGATE_PORT_LOCK_FD"
#: the pipe a worker writes a line to once it listens (service.started waits for all)
READY_FD = "TOLLGATE_READY_FD"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: how long a new parent waits for the workers of a killed one to finish their requests
PORT_WAIT = 15.0
#: how often the parent looks at the embedded PostgreSQL
CHECK_EVERY = 2.0


async def _prepare(dsn: str) -> None:
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await apply_schema(conn)
    finally:
        await pool.close()


@contextlib.contextmanager
def _claim_port(settings: Settings) -> Iterator[IO[str]]:
    """An exclusive lock per port, held by the parent and inherited by its workers, so it
    is free only once no process of a generation listens any more (a worker lets go of it
    when it stops listening, before it finishes the requests in flight). SO_REUSEPORT
    alone would let a new generation bind beside the old one's orphans, with another
    configuration."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with (settings.data_dir / f".serve-{settings.port}.lock").open("a+") as lock:
        deadline = time.monotonic() + PORT_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.seek(0)
                    holders = ", ".join(lock.read().split()) or "unknown"
                    raise RuntimeError(
                        f"port {settings.port} is still served by an earlier "
                        f"`tollgate serve --workers` (pids {holders}); not sharing it"
                    ) from None
                time.sleep(0.2)
        # The lock is DATA_DIR's: a generation started with another DATA_DIR (or from
        # another folder, under the default ./.data) does not see it, and SO_REUSEPORT
        # would split the port's connections between the two configurations. A socket
        # bound without it is refused while anything listens there.
        while not _port_free(settings.host, settings.port):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"port {settings.port} on {settings.host} is in use by another process "
                    "(another `tollgate serve`, perhaps with another DATA_DIR); not sharing it"
                )
            time.sleep(0.2)
        yield lock


def _port_free(host: str, port: int) -> bool:
    """Whether nothing listens on (host, port): a bind without SO_REUSEPORT succeeds."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror:
        return True  # said by the bind that follows, as before
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as exc:  # any other trouble: the workers' own bind says it
            return exc.errno != errno.EADDRINUSE
    return True


def serve_workers(settings: Settings, workers: int) -> int:
    with _claim_port(settings) as lock:
        dsn, embedded = resolve_dsn(settings)
        children: list[subprocess.Popen[bytes]] = []
        # The workers count there, so that a scrape of any one of them sums them all.
        metrics_dir = fresh_multiprocess_dir(settings.data_dir)
        ready, ready_w = os.pipe()
        pipe = [ready, ready_w]  # what is still open here
        try:
            asyncio.run(_prepare(dsn))
            projections = settings.run_projections
            _spawn(children, workers, dsn, embedded, lock, metrics_dir, ready_w,
                   projections=projections)  # fmt: skip
            os.close(pipe.pop())  # the workers hold it now: once each has written, EOF
            os.set_blocking(ready, False)

            def started() -> None:
                log.info(
                    "service.started",
                    listen=listen_url(settings),
                    dashboard=dashboard_url(settings),
                    workers=workers,
                    projections="own process" if projections else "elsewhere",
                )
                issuer_guessed(settings)

            listening = _Listening(ready, workers, started)
            return _watch(children, Supervisor(embedded) if embedded is not None else None,
                          listening)  # fmt: skip
        finally:
            for fd in pipe:
                os.close(fd)
            for child in children:
                if child.poll() is None:
                    child.kill()
            if embedded is not None:
                embedded.stop()
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _spawn(
    children: list[subprocess.Popen[bytes]],
    workers: int,
    dsn: str,
    embedded: EmbeddedPostgres | None,
    lock: IO[str],
    metrics_dir: Path,
    ready: int,
    *,
    projections: bool,
) -> None:
    """The workers, and with `projections` the process that runs the SQL projections: off
    the serving processes, whose cores then go to requests (a token is decoded, folded and
    written a second time for `live_tokens`: about a tenth of a serving process's time
    under load), and with no standby runners that try the projections' locks every 2 s."""
    env = {
        **os.environ,
        MULTIPROCESS_DIR: str(metrics_dir),
        "DATABASE_URL": dsn,
        "TOLLGATE_REUSE_PORT": "1",
        PARENT_PID: str(os.getpid()),
        PORT_LOCK_FD: str(lock.fileno()),
        READY_FD: str(ready),
    }
    if embedded is not None:
        env[EMBEDDED_PGDATA] = str(embedded.pgdata)
    if projections:
        env["RUN_PROJECTIONS"] = "false"
    # SIGINT blocked while they are spawned, and so in them (a mask outlives exec) until
    # each has its handlers (`unblock_stop_signals`): a terminal's Ctrl-C signals the whole
    # group, and a child still starting its interpreter printed "Fatal Python error:
    # init_import_site". Kept pending, it stops the child once it can stop cleanly, and
    # the parent once the children are spawned.
    masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        _start(children, workers, env, lock, ready, projections=projections)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, masked)
    # For the one line of a new parent that finds the port still held.
    lock.seek(0)
    lock.truncate()
    lock.write(" ".join(str(pid) for pid in (os.getpid(), *(c.pid for c in children))) + "\n")
    lock.flush()


def _start(
    children: list[subprocess.Popen[bytes]],
    workers: int,
    env: dict[str, str],
    lock: IO[str],
    ready: int,
    *,
    projections: bool,
) -> None:
    for _ in range(workers):
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],
                env=env,
                pass_fds=(lock.fileno(), ready),
            )
        )
    if projections:
        # It listens on no port: it does not hold the port's lock, nor the pipe (close_fds).
        own = {
            k: v for k, v in env.items() if k not in ("TOLLGATE_REUSE_PORT", PORT_LOCK_FD, READY_FD)
        }
        children.append(
            subprocess.Popen([sys.executable, "-m", "service", "projections", "run"], env=own)
        )


class _Listening:
    """Counts the workers that said they listen, from the pipe they write a line to; calls
    `started` once all of them have: service.started is the moment the port serves with
    every worker, not the moment they were spawned."""

    def __init__(self, fd: int, workers: int, started: Callable[[], None]) -> None:
        self.fd = fd
        self.waiting = workers
        self.started = started

    def look(self) -> None:
        if self.waiting <= 0:
            return
        try:
            said = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        self.waiting -= said.count(b"\n")
        if self.waiting <= 0:
            self.started()


def said_listening() -> None:
    """In a worker, once it listens: tells the parent, which says service.started for all."""
    fd = os.environ.pop(READY_FD, None)
    if fd is not None:
        with contextlib.suppress(OSError, ValueError):
            os.write(int(fd), b"\n")
            os.close(int(fd))


def _watch(
    children: list[subprocess.Popen[bytes]],
    supervisor: Supervisor | None,
    listening: _Listening | None = None,
) -> int:
    """Wait for the workers; 0 when they stopped because we were asked to, 1 when one
    exited on its own or the database could not be kept up."""
    stopping = False

    def forward(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def fail(event: str) -> int:
        log.error(event, codes=[c.poll() for c in children])
        forward(signal.SIGTERM, None)
        for child in children:
            child.wait()
        return 1

    # SIGHUP too: its default ends the parent alone, at once; not when it is ignored
    # (`nohup`): the service must then outlive its terminal
    for signum in stop_signals():
        signal.signal(signum, forward)
    next_check = time.monotonic() + CHECK_EVERY
    while any(child.poll() is None for child in children):
        # A worker that exits on its own is a failure: stop the others and say so, so the
        # supervisor (systemd, Kubernetes) restarts the whole service.
        if not stopping and any(child.poll() is not None for child in children):
            return fail("workers.worker_exited")
        if listening is not None and not stopping:
            listening.look()
        if supervisor is not None and not stopping and time.monotonic() >= next_check:
            if not supervisor.check():
                return fail("workers.database_lost")
            next_check = time.monotonic() + CHECK_EVERY
        time.sleep(0.2)
    if stopping:
        return 0
    # Every worker ended between two looks, none asked to: a failure all the same.
    log.error("workers.worker_exited", codes=[c.poll() for c in children])
    return 1


def bind_to_parent() -> None:
    """In a worker, first thing: die with the parent. The kernel sends SIGTERM when the
    parent dies (PR_SET_PDEATHSIG); a parent that died before that was set is caught by
    comparing the parent pid, and a watchdog thread catches what the kernel does not
    (another platform, a parent thread that exits)."""
    expected = os.environ.get(PARENT_PID)
    if expected is None:  # TOLLGATE_REUSE_PORT set by hand: no parent to follow
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("workers.no_parent_death_signal", errno=ctypes.get_errno())
    parent = int(expected)
    if os.getppid() != parent:
        raise RuntimeError(f"the parent process (pid {parent}) is gone; not serving")
    threading.Thread(target=_watchdog, args=(parent,), name="parent-watchdog", daemon=True).start()


def _watchdog(parent: int, every: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    log.error("workers.orphaned", parent=parent)
    os.kill(os.getpid(), signal.SIGTERM)


def as_worker(app: web.Application) -> None:
    """What a worker adds to its application: /healthz follows the embedded PostgreSQL
    that its parent keeps up, and the port lock goes once the worker stops listening."""
    pgdata = os.environ.get(EMBEDDED_PGDATA)
    if pgdata:
        app[DATABASE_WATCH] = EmbeddedPostgres(Path(pgdata))
    lock_fd = os.environ.get(PORT_LOCK_FD)
    if lock_fd is not None:

        async def release_port(_app: web.Application) -> None:
            # aiohttp runs this once the listening socket is closed (and before the
            # requests in flight finish, which may take SHUTDOWN_TIMEOUT).
            with contextlib.suppress(OSError, ValueError):
                os.close(int(lock_fd))

        app.on_shutdown.append(release_port)
