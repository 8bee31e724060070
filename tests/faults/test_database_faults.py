"""The database dies or stalls under load: the service answers within a bound, recovers
by itself, and loses no acknowledged write."""

from __future__ import annotations

import asyncio
import os
import signal

import psutil

from tests.faults.load import FAULT_ENV, check_the_log, load, tenant, usable_at_the_gateway
from tests.faults.process import kill_everything, start

DB_TIMEOUT = 2


def no_server_errors(tally) -> None:
    assert not [s for s in tally.statuses if isinstance(s, int) and s >= 500 and s != 503], (
        tally.statuses
    )


async def test_postgres_killed_mid_load_is_restarted_and_the_service_recovers_by_itself(
    tmp_path, figures
):
    service = start(tmp_path / "data", **FAULT_ENV, DB_TIMEOUT=str(DB_TIMEOUT))
    try:
        await service.wait_status(200, 90)
        who = await tenant(service)

        async def kill_the_database() -> None:
            await asyncio.sleep(3)
            os.kill(service.postmaster_pid(), signal.SIGKILL)

        tally, _ = await asyncio.gather(load(service.base, who, seconds=15), kill_the_database())
        assert service.logged("embedded_postgres.died")
        assert service.logged("embedded_postgres.restarted")
        # by itself: after the restart, the same clients are served again
        after = await load(service.base, who, seconds=3, clients=2, requests=20)
        assert after.statuses[200] > 0, after.statuses
        no_server_errors(tally)
        tally.tokens += after.tokens
        tally.names += after.names
        await usable_at_the_gateway(service.base, tally.tokens)
        assert service.stop() == 0
        figures.update(await check_the_log(service, tally), answers=dict(tally.statuses))
    finally:
        kill_everything(service)


def the_whole_server(service) -> list[psutil.Process]:
    postmaster = psutil.Process(service.postmaster_pid())
    return [postmaster, *postmaster.children(recursive=True)]


async def test_a_stalled_database_is_answered_within_the_bound_and_then_served(tmp_path, figures):
    service = start(tmp_path / "data", **FAULT_ENV, DB_TIMEOUT=str(DB_TIMEOUT))
    try:
        await service.wait_status(200, 90)
        who = await tenant(service)
        stalled: list[float] = []

        async def stall() -> None:
            await asyncio.sleep(2)
            processes = the_whole_server(service)
            for p in processes:
                p.suspend()
            started = asyncio.get_running_loop().time()
            await asyncio.sleep(6)
            for p in processes:
                p.resume()
            stalled.append(asyncio.get_running_loop().time() - started)

        tally, _ = await asyncio.gather(load(service.base, who, seconds=12), stall())
        no_server_errors(tally)
        # Without DB_TIMEOUT, requests hang for as long as the stall lasts.
        assert tally.longest < DB_TIMEOUT + 3, (tally.longest, tally.statuses)
        assert tally.statuses[503] > 0, tally.statuses  # the stall was felt
        after = await load(service.base, who, seconds=3, clients=2, requests=20)
        assert after.statuses[200] > 0, after.statuses
        tally.tokens += after.tokens
        tally.names += after.names
        await usable_at_the_gateway(service.base, tally.tokens)
        assert service.stop() == 0
        figures.update(
            await check_the_log(service, tally),
            longest_answer_s=round(tally.longest, 2),
            stalled_s=round(stalled[0], 1),
            answers=dict(tally.statuses),
        )
    finally:
        kill_everything(service)
