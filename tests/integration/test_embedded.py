"""The embedded PostgreSQL shared by several processes: the last one out stops it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.embedded import EmbeddedPostgres

HOLDER = """
import sys
from pathlib import Path
from service.embedded import EmbeddedPostgres
server = EmbeddedPostgres(Path(sys.argv[1]), durable=False)
server.start()
print("up", flush=True)
sys.stdin.read()  # until the test closes our stdin
server.stop()
"""


def test_a_process_that_stops_leaves_the_server_to_one_still_using_it(tmp_path: Path):
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
