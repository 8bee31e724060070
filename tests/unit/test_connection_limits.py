"""At MAX_CONNECTIONS a new client takes the place of an idle keep-alive connection, and
only of one truly idle: not one whose request is read but not yet handled, nor one whose
answer still waits in its buffer for a client that stopped reading. Real sockets, the
service's own Runner, an application without a database."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from service.web.server import Limits, Runner

#: answers from 64 kB to 3 MB: for some of them what the kernel cannot take for a client
#: that reads nothing is less than the write buffer's high-water mark, so the answer counts
#: as written while part of it waits in the buffer
SIZES = range(64 * 1024, 3 * 1024 * 1024, 96 * 1024)


@asynccontextmanager
async def serving(app: web.Application, limits: Limits) -> AsyncIterator[tuple[Runner, int]]:
    runner = Runner(app, limits=limits, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def big(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * int(request.match_info["size"]))


async def test_a_client_that_stops_reading_keeps_its_place_counted():
    """Its answer waits in the buffer, so a close would never finish: evicting it freed
    its slot while the socket stayed open, and sockets grew past any bound."""
    app = web.Application()
    app.router.add_get("/big/{size}", big)
    limits = Limits(body_timeout=15, max_connections=3)
    loop = asyncio.get_running_loop()
    clients = []
    async with serving(app, limits) as (runner, port):
        try:
            for size in SIZES:
                client = socket.socket()
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
                client.setblocking(False)
                await loop.sock_connect(client, ("127.0.0.1", port))
                request = f"GET /big/{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
                await loop.sock_sendall(client, request)
                clients.append(client)  # never read
                await asyncio.sleep(0.1)
            assert runner.server is not None
            assert limits.open == 3
            assert len(runner.server.connections) <= 3
        finally:
            for client in clients:
                client.close()


async def test_a_request_read_but_not_yet_handled_is_not_idle():
    """aiohttp takes the request off its queue, then starts its handler a step later: a
    new connection arriving in between closed it, the request read and never answered."""
    seen: list[bool] = []
    limits = Limits(body_timeout=15, max_connections=1)

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", hello)
    async with serving(app, limits) as (runner, port):
        assert runner.server is not None
        made = runner.server.request_factory
        loop = asyncio.get_running_loop()

        def factory(message, payload, protocol, writer, task, _cls=None):  # type: ignore[no-untyped-def]
            def in_between() -> None:  # as a new connection's connection_made would run
                seen.append(protocol.idle)
                limits.make_room()

            loop.call_soon(in_between)
            return made(message, payload, protocol, writer, task)

        runner.server.request_factory = factory
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert seen == [False]
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_what_the_http_layer_answers_itself_is_counted_in_the_metrics():
    """A request the parser refuses, one that never finishes arriving, and a connection
    over the bound are answered before any route: the request counter never saw them, so a
    flood of them was invisible on the dashboards."""
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import METRICS, Metrics

    app = web.Application()
    app[METRICS] = Metrics()

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/", hello)
    limits = Limits(body_timeout=0.5, max_connections=2)

    def rejected() -> dict[str, float]:
        body, _ = app[METRICS].render()
        return {
            sample.labels["reason"]: sample.value
            for family in text_string_to_metric_families(body.decode())
            if family.name == "tollgate_http_rejected"
            for sample in family.samples
            if sample.name == "tollgate_http_rejected_total"
        }

    async def answer_to(port: int, request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        try:
            return await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()

    async with serving(app, limits) as (_runner, port):
        assert rejected() == {"malformed": 0, "timeout": 0, "too_many_connections": 0}
        slow = [answer_to(port, b"GET / HTTP/1.1\r\nHost: t\r\n") for _ in range(2)]
        arriving = [asyncio.create_task(request) for request in slow]
        await asyncio.sleep(0.1)  # both counted, neither idle
        over = await answer_to(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert over.startswith(b"HTTP/1.1 503 ")
        for answer in await asyncio.gather(*arriving):
            assert answer.startswith(b"HTTP/1.1 408 ")
        bad = await answer_to(port, b"GET / HTTP/1.1\r\nHost: t\r\nNo colon here\r\n\r\n")
        assert bad.split(b"\r\n")[0].endswith(b" 400 Bad Request")
        fine = await answer_to(port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert fine.startswith(b"HTTP/1.1 200 ")
        assert rejected() == {"malformed": 1, "timeout": 2, "too_many_connections": 1}
