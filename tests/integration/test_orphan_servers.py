"""A test session killed before it could stop its embedded PostgreSQL leaves the server
running; the next session stops it and removes its folder, and leaves live ones alone."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import OWNER, reap_orphans


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def test_a_killed_sessions_server_is_stopped_and_its_folder_removed(tmp_path):
    # SIGQUIT's default action, whatever this session inherited: a shell that starts the
    # suite as a background job without job control has it ignored, and that is inherited
    # (a real postmaster handles SIGQUIT itself).
    stand_in = "import signal, time; signal.signal(signal.SIGQUIT, signal.SIG_DFL); time.sleep(60)"
    server = subprocess.Popen([sys.executable, "-c", stand_in])
    try:
        orphan = tmp_path / "tollgate-test-orphan"
        (orphan / "pg").mkdir(parents=True)
        (orphan / OWNER).write_text(str(dead_pid()))
        (orphan / "pg" / "postmaster.pid").write_text(f"{server.pid}\n/tmp/x\n")
        live = tmp_path / "tollgate-test-live"
        live.mkdir()
        (live / OWNER).write_text(str(os.getpid()))
        unknown = tmp_path / "tollgate-test-unknown"
        unknown.mkdir()

        assert reap_orphans(tmp_path) == [orphan]
        assert server.wait(10) is not None  # the orphan's server was stopped
        assert not orphan.exists() and live.exists() and unknown.exists()
    finally:
        server.kill()
        server.wait()
