"""Processes that cannot outlive their parent, one generation per port, and an embedded
PostgreSQL that is kept up: `/healthz` says 503 while it is down."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import psutil
import pytest

from tests.faults.load import tenant
from tests.faults.process import Service, kill_everything, start


async def until(condition, seconds: float) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "the condition never held"
        await asyncio.sleep(0.1)


def gone_within(processes: list[psutil.Process], seconds: float) -> bool:
    _gone, alive = psutil.wait_procs(processes, timeout=seconds)
    return not alive


async def test_workers_die_with_a_killed_parent_and_a_new_generation_takes_the_port(db, tmp_path):
    first = start(tmp_path / "data", "--workers", "2", DATABASE_URL=db.dsn)
    second: Service | None = None
    try:
        await first.wait_status(200)
        workers = first.workers()
        assert len(workers) == 2
        children = first.children()
        assert len(children) == 3  # and the process that runs the SQL projections
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        # Before: the workers went on serving with PPID 1 for good.
        assert gone_within(children, 15), [c.status() for c in children if c.is_running()]
        second = start(tmp_path / "data", "--workers", "2", port=first.port, DATABASE_URL=db.dsn)
        await second.wait_status(200)
        assert {w.ppid() for w in second.workers()} == {second.proc.pid}
        assert second.stop() == 0
    finally:
        kill_everything(first)
        if second is not None:
            kill_everything(second)


async def test_a_new_parent_refuses_the_port_while_old_workers_still_hold_it(db, tmp_path):
    first = start(tmp_path / "data", "--workers", "2", DATABASE_URL=db.dsn)
    second: Service | None = None
    try:
        await first.wait_status(200)
        # Both workers listening: the one that answered is not the only one. The parent's
        # death (SIGTERM) is taken by a Python-level handler from the start, so a worker
        # stopped with it pending acts on it only once resumed.
        await first.wait_listening(2)
        workers = first.workers()
        for worker in workers:  # they cannot act on their parent's death while stopped
            worker.suspend()
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        second = start(
            tmp_path / "data", "--workers", "2", port=first.port, DATABASE_URL=db.dsn,
            log_name="second.log",
        )  # fmt: skip
        # Before: the new generation bound beside the old one (SO_REUSEPORT) and served.
        assert second.proc.wait(40) == 1
        said = second.log().strip().splitlines()
        assert "Traceback" not in second.log()
        assert said[-1].startswith(f"tollgate: cannot serve: port {first.port} is still served")
        assert str(workers[0].pid) in said[-1]
        for worker in workers:
            worker.resume()  # the parent-death signal was pending: they stop now
        assert gone_within(workers, 15)
    finally:
        kill_everything(first)
        if second is not None:
            kill_everything(second)


def test_a_worker_whose_parent_is_already_gone_does_not_serve(db, tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": db.dsn,
        "DATA_DIR": str(tmp_path),
        "LOG_FORMAT": "json",
        "TOLLGATE_REUSE_PORT": "1",
        "TOLLGATE_PARENT_PID": "1",  # it was started by a parent that has died since
    }
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve"], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 1
    err = done.stderr.decode()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "tollgate: cannot serve: the parent process (pid 1) is gone; not serving"
    )


def break_and_kill_the_database(service: Service) -> None:
    """Kill the postmaster so that it cannot be restarted until `repair`."""
    (service.pgdata / "PG_VERSION").rename(service.pgdata / "PG_VERSION.away")
    os.kill(service.postmaster_pid(), signal.SIGKILL)


def repair(service: Service) -> None:
    (service.pgdata / "PG_VERSION.away").rename(service.pgdata / "PG_VERSION")


@pytest.mark.parametrize("args", [(), ("--workers", "2")], ids=["one-process", "workers"])
async def test_a_dead_embedded_database_is_restarted_and_healthz_says_so_meanwhile(tmp_path, args):
    service = start(tmp_path / "data", *args)
    try:
        await service.wait_status(200, 90)
        await service.wait_listening(len(service.workers()))
        break_and_kill_the_database(service)
        # Before: /healthz said ok while every token request got 503, for ever.
        await service.wait_status(503, 15)
        await until(lambda: service.logged("embedded_postgres.restart_failed"), 15)
        assert await service.healthz_now() == 503
        repair(service)
        await until(lambda: service.logged("embedded_postgres.restarted"), 30)
        await service.wait_status(200, 30)
        assert service.stop() == 0
    finally:
        kill_everything(service)


async def test_the_service_exits_non_zero_when_the_database_cannot_be_restarted(tmp_path):
    service = start(tmp_path / "data")
    try:
        await service.wait_status(200, 90)
        break_and_kill_the_database(service)
        started = time.monotonic()
        while service.proc.poll() is None and time.monotonic() - started < 60:
            time.sleep(0.2)
        assert service.proc.returncode == 1, service.log()[-2000:]
        assert service.logged("embedded_postgres.gave_up")
        last = service.log().strip().splitlines()[-1]
        assert last == "tollgate: the embedded PostgreSQL died and could not be restarted"
    finally:
        kill_everything(service)


async def live_tokens(db, client_id: str) -> int:
    return int(
        await db.pool.fetchval("SELECT count(*) FROM live_tokens WHERE client_id = $1", client_id)
    )


async def test_the_sql_projections_run_in_a_process_of_their_own_that_the_service_needs(
    db, tmp_path
):
    service = start(tmp_path / "data", "--workers", "2", DATABASE_URL=db.dsn)
    try:
        await service.wait_status(200)
        await service.wait_listening(2)
        [projections] = service.projections()
        assert projections.ppid() == service.proc.pid
        # The workers run no projection, not even standing by on the locks.
        assert {w.environ().get("RUN_PROJECTIONS") for w in service.workers()} == {"false"}
        acme = await tenant(service)
        client_id = acme.application["client_id"]
        async with aiohttp.ClientSession() as http:

            async def issue() -> None:
                async with http.post(
                    f"{service.base}/oauth/token", data={"grant_type": "client_credentials"},
                    headers=acme.credentials,
                ) as r:  # fmt: skip
                    assert r.status == 200, await r.text()

            await issue()
            started = time.monotonic()
            while await live_tokens(db, client_id) < 1:
                assert time.monotonic() - started < 15, "the token was never projected"
                await asyncio.sleep(0.1)
            # That process is the one that projects: stopped, nothing more is applied, while
            # the workers go on issuing.
            projections.suspend()
            await issue()
            await asyncio.sleep(1.5)
            assert await live_tokens(db, client_id) == 1
            projections.resume()
            started = time.monotonic()
            while await live_tokens(db, client_id) < 2:
                assert time.monotonic() - started < 15, "the second token was never projected"
                await asyncio.sleep(0.1)
        # It is part of the service: killed, the service stops and says so, as for a worker.
        workers = service.workers()
        projections.kill()
        assert service.proc.wait(30) == 1
        assert service.logged("workers.worker_exited")
        assert gone_within(workers, 15)
    finally:
        kill_everything(service)


async def test_with_run_projections_off_the_parent_starts_no_projections_process(db, tmp_path):
    service = start(
        tmp_path / "data", "--workers", "2", DATABASE_URL=db.dsn, RUN_PROJECTIONS="false"
    )
    try:
        await service.wait_status(200)
        await service.wait_listening(2)
        assert service.projections() == []
        assert len(service.children()) == 2
        assert service.stop() == 0
    finally:
        kill_everything(service)


async def test_a_generation_with_another_data_dir_does_not_share_the_port(db, tmp_path):
    """The port's lock is DATA_DIR's: a second `serve --workers` started with another one
    (or from another folder, under the default ./.data) saw no lock and bound beside the
    first (SO_REUSEPORT), splitting its clients between two configurations."""
    first = start(tmp_path / "data", "--workers", "2", DATABASE_URL=db.dsn)
    second: Service | None = None
    try:
        await first.wait_status(200)
        second = start(
            tmp_path / "other", "--workers", "2", port=first.port, DATABASE_URL=db.dsn,
            log_name="second.log",
        )  # fmt: skip
        assert second.proc.wait(40) == 1
        said = second.log().strip().splitlines()
        assert said[-1].startswith(f"tollgate: cannot serve: port {first.port} on ")
        assert "in use by another process" in said[-1]
        assert len(first.workers()) == 2  # the first serves on, alone
        await first.wait_status(200)
    finally:
        kill_everything(first)
        if second is not None:
            kill_everything(second)


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one-process", "workers"])
async def test_sighup_stops_the_service_as_sigterm_does(db, tmp_path, workers):
    """Python's default for SIGHUP (a closed terminal, an operator used to "reload") ended
    the process at once: requests in flight unanswered, no service.stopping, the workers'
    metrics files left behind."""
    service = start(tmp_path / "data", *workers, DATABASE_URL=db.dsn)
    try:
        await service.wait_status(200)
        service.proc.send_signal(signal.SIGHUP)
        assert service.proc.wait(60) == 0  # not -1: stopped, not killed
        assert not list((tmp_path / "data" / "metrics").glob("workers-*"))
    finally:
        kill_everything(service)


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one-process", "workers"])
async def test_under_nohup_the_service_outlives_its_terminal(db, tmp_path, workers):
    """Started with SIGHUP ignored (`nohup`, some supervisors), a hang-up stops nothing: the
    parent of `--workers` forwarded it to its children as a SIGTERM, and `serve` replaced
    the ignored signal with its own handler. SIGTERM still stops it all."""
    service = start(tmp_path / "data", *workers, DATABASE_URL=db.dsn, prefix=("nohup",))
    try:
        await service.wait_status(200)
        children = psutil.Process(service.proc.pid).children(recursive=True)
        service.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.5)
        assert service.proc.poll() is None
        assert all(child.is_running() for child in children)
        await service.wait_status(200)
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(60) == 0
    finally:
        kill_everything(service)


@pytest.mark.parametrize("args", [(), ("--workers", "2")], ids=["one-process", "workers"])
async def test_ctrl_c_at_any_moment_of_the_start_prints_no_traceback(db, tmp_path, args):
    """A terminal's Ctrl-C signals the whole foreground group: pressed while the command
    was still importing it printed a traceback, and workers still starting their
    interpreters printed "Fatal Python error: init_import_site"."""
    for n, delay in enumerate((0.05, 0.2, 0.4, 0.7, 1.0, 1.5)):
        service = start(tmp_path / f"data-{n}", *args, DATABASE_URL=db.dsn)
        try:
            await asyncio.sleep(delay)
            children = service.children()
            os.killpg(service.proc.pid, signal.SIGINT)
            code = service.proc.wait(30)
            said = service.log()
            assert "Traceback" not in said and "Fatal Python error" not in said, (delay, said)
            assert code in (0, 130, -2), (delay, code, said)  # -2: see below
            assert gone_within(children, 15)  # nothing left running
        finally:
            kill_everything(service)


async def test_a_service_whose_stderr_is_gone_still_stops(db, tmp_path):
    """A closed terminal or a log reader that exited: every line written after that fails
    (EIO, EPIPE). The projections process's line on SIGTERM raised before it cancelled its
    work, so it never stopped, and neither did its parent, waiting for it."""
    from tests.faults.process import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {
        "DATABASE_URL": db.dsn, "DATA_DIR": str(tmp_path), "PORT": str(port),
        "LOG_FORMAT": "json", "LOG_LEVEL": "info",
    }  # fmt: skip
    read, write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--workers", "2"],
        env=env, stdin=subprocess.DEVNULL, stdout=write, stderr=write, start_new_session=True,
    )  # fmt: skip
    os.close(write)
    service = Service(proc, port, tmp_path, tmp_path / "no.log", env)
    try:
        await service.wait_listening(2)
        children = service.children()
        assert len(children) == 3  # and the projections process
        os.close(read)  # the reader is gone
        assert await service.healthz_now() == 200  # a request's line cannot be written
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert gone_within(children, 15)
    finally:
        kill_everything(service)


@pytest.mark.parametrize("args", [(), ("--workers", "2")], ids=["one-process", "workers"])
async def test_ctrl_c_while_starting_stops_the_embedded_database_too(tmp_path, args):
    """Ctrl-C while the embedded PostgreSQL was being started (pg_ctl starts it in a session
    of its own), or while the application started, left it running with nobody to stop it."""
    data = tmp_path / "data"
    warm = start(data, *args)  # the first start creates the cluster (initdb)
    try:
        await warm.wait_status(200, seconds=120)
        assert warm.stop() == 0
    finally:
        kill_everything(warm)
    for n, delay in enumerate((0.05, 0.1, 0.3, 0.45, 0.6, 0.7, 0.8, 1.0, 1.5, 2.5)):
        service = start(data, *args, log_name=f"run-{n}.log")
        try:
            await asyncio.sleep(delay)
            service.proc.send_signal(signal.SIGINT)  # as a supervisor's, to the process alone
            code = service.proc.wait(60)
            said = service.log()
            # -2: Python ends by SIGINT itself when a KeyboardInterrupt reaches it last
            assert code in (0, 130, -2), (delay, code, said)
            assert "Traceback" not in said and "Fatal Python error" not in said, (delay, said)
            pidfile = service.pgdata / "postmaster.pid"
            assert not pidfile.exists() or not psutil.pid_exists(service.postmaster_pid()), (
                delay, said,
            )  # fmt: skip
        finally:
            kill_everything(service)
