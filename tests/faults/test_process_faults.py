"""The service's own processes die under load: restarted (as a supervisor would), it
serves again, and no acknowledged write is lost."""

from __future__ import annotations

import asyncio
import signal

import psutil

from tests.faults.load import FAULT_ENV, check_the_log, load, tenant, usable_at_the_gateway
from tests.faults.process import Service, kill_everything, start


async def restart_after(
    seconds: float, first: Service, args: tuple[str, ...], kill: list[psutil.Process]
) -> Service:
    """SIGKILL `first`'s parent after `seconds`, then start the same command on the same
    port and DATA_DIR, as systemd's Restart=always would."""
    await asyncio.sleep(seconds)
    kill.extend(first.children())
    first.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.proc.wait, 10)
    second = start(first.data_dir, *args, port=first.port, log_name="second.log", **FAULT_ENV)
    await second.wait_status(200, 90)
    return second


async def test_the_service_sigkilled_mid_load_and_restarted_loses_no_write(tmp_path, figures):
    first = start(tmp_path / "data", **FAULT_ENV)
    second: Service | None = None
    try:
        await first.wait_status(200, 90)
        who = await tenant(first)
        tally, second = await asyncio.gather(
            load(first.base, who, seconds=15), restart_after(4, first, (), [])
        )
        assert tally.statuses[200] > 0 and any(isinstance(s, str) for s in tally.statuses)
        assert not [s for s in tally.statuses if isinstance(s, int) and s >= 500 and s != 503]
        await usable_at_the_gateway(second.base, tally.tokens)
        assert second.stop() == 0
        figures.update(await check_the_log(second, tally), answers=dict(tally.statuses))
    finally:
        kill_everything(first)
        if second is not None:
            kill_everything(second)


async def test_workers_with_their_parent_killed_mid_load_leave_the_port_to_the_next(
    tmp_path, figures
):
    args = ("--workers", "2")
    first = start(tmp_path / "data", *args, **FAULT_ENV)
    second: Service | None = None
    old_workers: list[psutil.Process] = []
    try:
        await first.wait_status(200, 90)
        await first.wait_listening(2)
        who = await tenant(first)
        tally, second = await asyncio.gather(
            load(first.base, who, seconds=15), restart_after(4, first, args, old_workers)
        )
        # The old generation is gone (its requests in flight had SHUTDOWN_TIMEOUT to
        # finish): only the new parent's workers serve the port.
        _gone, alive = psutil.wait_procs(old_workers, timeout=70)
        assert not alive
        assert {w.ppid() for w in second.workers()} == {second.proc.pid}
        assert not [s for s in tally.statuses if isinstance(s, int) and s >= 500 and s != 503]
        await usable_at_the_gateway(second.base, tally.tokens)
        assert second.stop() == 0
        figures.update(await check_the_log(second, tally), answers=dict(tally.statuses))
    finally:
        for worker in old_workers:
            if worker.is_running():
                worker.kill()
        kill_everything(first)
        if second is not None:
            kill_everything(second)
