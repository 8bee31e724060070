"""A newcomer's first commands on a fresh copy of the checkout inside a folder only its
owner may enter (a 0700 home, `mktemp -d`): `make run` serves and `make test` passes, in
either order, and nothing above the copy changes (no o+x on the folders, no new account)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.install.support import (
    accounts,
    clean_env,
    ctrl_c,
    folders_above,
    free_port,
    fresh_copy,
    wait_healthy,
)

pytestmark = [pytest.mark.install, pytest.mark.timeout(900)]

SUBSET = "tests/integration/test_smoke_db.py tests/integration/test_embedded.py -p no:cacheprovider"


def make_run(copy: Path, port: int) -> None:
    log = copy.parent / "make-run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=copy, env=clean_env(PORT=str(port)), stdout=out, stderr=out,
            start_new_session=True,  # its own group: Ctrl-C reaches make and the service
        )  # fmt: skip
    try:
        wait_healthy(port, proc, log, seconds=300)  # the first start installs the service
    finally:
        text = ctrl_c(proc, log)
    assert "embedded_postgres.started" in text
    assert "embedded_postgres.stopped" in text
    assert not (copy / ".data" / "postgres" / "postmaster.pid").exists()


def make_test(copy: Path, tmp: Path) -> None:
    # Its throw-away database goes behind the private folder too.
    env = clean_env(TMPDIR=str(tmp))
    done = subprocess.run(
        ["make", "--no-print-directory", "test", f"PYTEST_ARGS={SUBSET}"],
        cwd=copy, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout
    assert " error" not in done.stdout


@pytest.mark.parametrize("order", [("run", "test"), ("test", "run")], ids="-then-".join)
def test_a_fresh_copy_in_a_private_folder_runs_and_tests(
    tmp_path: Path, order: tuple[str, str]
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    tmp = private / "tmp"
    tmp.mkdir(mode=0o700)
    copy = fresh_copy(private / "tollgate")
    before, known = folders_above(copy), accounts()

    for step in order:
        if step == "run":
            make_run(copy, free_port())
        else:
            make_test(copy, tmp)

    assert folders_above(copy) == before
    assert oct(private.stat().st_mode & 0o777) == "0o700"
    assert accounts() == known
    if os.geteuid() == 0:  # the cluster is root's own, not a server account's
        assert (copy / ".data" / "postgres").stat().st_uid == 0
