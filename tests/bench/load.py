"""A small HTTP load generator: N keep-alive connections for a fixed time, in a process
of its own, so that it does not share an event loop with the server it measures."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class Result:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


RequestSpec = tuple[str, str, dict[str, str], bytes | None]  # method, path, headers, body


async def _run(
    base: str, spec: RequestSpec, connections: int, seconds: float, warmup: float
) -> Result:
    method, path, headers, body = spec
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(base_url=base, connector=connector) as http:
        started = time.perf_counter()
        measuring_from = started + warmup
        deadline = measuring_from + seconds

        async def worker() -> None:
            nonlocal errors
            while True:
                sent = time.perf_counter()
                if sent >= deadline:
                    return
                async with http.request(method, path, headers=headers, data=body) as response:
                    await response.read()
                    ok = response.status < 400
                done = time.perf_counter()
                if sent >= measuring_from:
                    if ok:
                        latencies.append(done - sent)
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    latencies.sort()
    if not latencies:
        return Result(0, errors, seconds, 0.0, 0.0)
    return Result(
        len(latencies),
        errors,
        seconds,
        latencies[len(latencies) // 2] * 1000,
        latencies[int(len(latencies) * 0.99)] * 1000,
    )


def _child(conn: multiprocessing.connection.Connection, *args: object) -> None:
    conn.send(asyncio.run(_run(*args)))  # type: ignore[arg-type]


def measure(
    base: str,
    spec: RequestSpec,
    *,
    connections: int = 64,
    seconds: float = 8.0,
    warmup: float = 1.0,
) -> Result:
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=_child, args=(child, base, spec, connections, seconds, warmup)
    )
    process.start()
    result: Result = parent.recv()
    process.join()
    return result


Factory = Callable[[], RequestSpec]
