"""A flood of connections that send their bodies a byte at a time: each is cut at
BODY_TIMEOUT, and the clients that send whole requests are served meanwhile."""

from __future__ import annotations

import asyncio
import time

from tests.faults.load import FAULT_ENV, check_the_log, load, tenant, usable_at_the_gateway
from tests.faults.process import kill_everything, start

BODY_TIMEOUT = 2
SLOW_CONNECTIONS = 150


async def slow_body(port: int, until: float, cut_after: list[float], answers: list[bytes]) -> None:
    """Connect, announce a body, and send it at a byte every half second, again and again
    until `until`; how long the server kept each connection, and its first answer line."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        started = time.monotonic()
        head = (
            "POST /oauth/token HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 200\r\n\r\n"
        )
        try:
            writer.write(head.encode())
            answer = b""
            while not answer and time.monotonic() - started < 30:
                writer.write(b"g")
                try:
                    answer = await asyncio.wait_for(reader.readline(), 0.5)
                except TimeoutError:
                    continue
                if not answer:
                    break  # closed without a word
        except OSError:
            answer = b""
        cut_after.append(time.monotonic() - started)
        answers.append(answer.split(b" ", 2)[1] if answer.count(b" ") >= 2 else b"closed")
        writer.close()


async def test_a_slow_body_flood_is_cut_and_whole_requests_are_served(tmp_path, figures):
    service = start(tmp_path / "data", **FAULT_ENV, BODY_TIMEOUT=str(BODY_TIMEOUT))
    try:
        await service.wait_status(200, 90)
        who = await tenant(service)
        cut_after: list[float] = []
        answers: list[bytes] = []
        until = time.monotonic() + 10
        flood = [
            slow_body(service.port, until, cut_after, answers) for _ in range(SLOW_CONNECTIONS)
        ]
        tally, *_ = await asyncio.gather(load(service.base, who, seconds=10), *flood)
        assert tally.statuses[200] > 0, tally.statuses
        assert not [s for s in tally.statuses if not (isinstance(s, int) and s < 500)], (
            tally.statuses
        )
        assert tally.longest < BODY_TIMEOUT + 3, tally.longest
        # Before BODY_TIMEOUT, a slow connection was held for as long as it kept sending.
        assert cut_after and max(cut_after) < BODY_TIMEOUT + 3, max(cut_after)
        assert set(answers) <= {b"408", b"closed"}, set(answers)
        await usable_at_the_gateway(service.base, tally.tokens)
        assert service.stop() == 0
        figures.update(
            await check_the_log(service, tally),
            slow_connections_cut=len(cut_after),
            longest_slow_connection_s=round(max(cut_after), 2),
            longest_answer_s=round(tally.longest, 2),
        )
    finally:
        kill_everything(service)
