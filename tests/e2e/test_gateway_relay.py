"""What the gateway relays, as a proxy in front of an API must: every line of a repeated
field, none of Tollgate's cookies, the body read whole (decoded, bounded, with its length),
none of aiohttp's own request fields; and an upstream that breaks off after its status
line leaves the client's connection closed unfinished, never a second answer inside the
first."""

from __future__ import annotations

import asyncio
import gzip
import socket
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from tests.conftest import make_company
from tests.e2e.oauth_helpers import cc_token, new_app
from tests.e2e.test_gateway import bearer, start

#: a bound on a hang, not a performance claim
WAIT = 20


@asynccontextmanager
async def gateway_to(db, settings, upstream_url: str, **overrides):
    # run as `tollgate serve` runs it (tests/conftest.py): a handler whose client leaves
    # is not cancelled for it
    client = await start(db, settings, upstream_url=upstream_url, **overrides)
    try:
        company = await make_company(client)
        app = await new_app(client, company, permissions=["invoices:read", "invoices:write"])
        token = (await cc_token(client, app))["access_token"]
        yield client, token
    finally:
        await client.close()


@asynccontextmanager
async def echo_upstream():
    seen: list[web.Request] = []
    bodies: list[bytes] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(request)
        bodies.append(await request.read())
        cookie = request.headers.get("X-Echo-Set-Cookie")
        return web.Response(text="ok", headers={"Set-Cookie": cookie} if cookie else None)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), seen, bodies
    finally:
        await server.close()


async def test_repeated_fields_pass_whole_and_tollgates_cookies_stay(db, settings):
    async with echo_upstream() as (url, seen, _), gateway_to(db, settings, url) as (client, token):
        headers = CIMultiDict(bearer(token))
        headers.add("X-Multi", "one")
        headers.add("X-Multi", "two")
        headers.add("Cookie", "tg_session=s3ss10n; app=1")
        headers.add("Cookie", "tg_login_csrf=x")
        headers.add("Cookie", "theme=dark; tg_dashboard_once=y")
        response = await client.get("/api/v1/invoices", headers=headers)
        assert response.status == 200
        [request] = seen
        assert request.headers.getall("X-Multi") == ["one", "two"]
        assert request.headers.getall("Cookie") == ["app=1", "theme=dark"]


async def test_the_body_is_read_whole_decoded_and_sent_with_its_length(db, settings):
    payload = b'{"hello": "world"}' * 1000
    async with (
        echo_upstream() as (url, seen, bodies),
        gateway_to(db, settings, url) as (
            client,
            token,
        ),
    ):

        async def in_pieces():
            for start in range(0, len(payload), 1000):
                yield payload[start : start + 1000]
                await asyncio.sleep(0)

        response = await client.post(
            "/api/v1/invoices", data=in_pieces(), headers=bearer(token),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )  # fmt: skip
        assert response.status == 200
        zipped = gzip.compress(payload)
        response = await client.post(
            "/api/v1/invoices", data=zipped,
            headers=bearer(token) | {"Content-Encoding": "gzip",
                                     "Content-Type": "application/json"},
        )  # fmt: skip
        assert response.status == 200
        chunked, decoded = seen
        assert bodies == [payload, payload]
        assert chunked.headers["Content-Length"] == str(len(payload))
        assert "Transfer-Encoding" not in chunked.headers
        for field in ("User-Agent", "Accept-Encoding", "Accept", "Content-Type"):
            assert field not in chunked.headers, field  # none of aiohttp's own
        assert "Content-Encoding" not in decoded.headers  # sent decoded, said so
        assert decoded.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"not gzip at all", {"Content-Encoding": "gzip"}, 400),
        (b"x" * 5000, {}, 413),
        (gzip.compress(b"x" * 50_000), {"Content-Encoding": "gzip"}, 413),  # a small bomb
    ],
    ids=["corrupt-gzip", "too-large", "too-large-decoded"],
)
async def test_a_body_the_gateway_cannot_take_never_reaches_the_upstream(
    db, settings, body, headers, status
):
    async with (
        echo_upstream() as (url, seen, _),
        gateway_to(db, settings, url, gateway_max_body=4096) as (client, token),
    ):
        response = await client.post("/api/v1/invoices", data=body, headers=bearer(token) | headers)
        assert response.status == status, await response.text()
        assert (await response.json())["error"] in ("invalid_request", "request_too_large")
        assert seen == []


async def _raw_upstream(answer: bytes) -> tuple[asyncio.Server, str]:
    """An upstream that reads a request's head, writes `answer` and closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def _exchange(port: int, request: bytes) -> bytes:
    """Everything the server sends on one connection until it closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(request)
        received = b""
        while piece := sock.recv(65536):
            received += piece
    return received


async def test_an_upstream_that_breaks_off_leaves_the_answer_unfinished(db, settings):
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: text/plain\r\n\r\nonly ten.\n"
    server, url = await _raw_upstream(cut)
    try:
        async with gateway_to(db, settings, url) as (client, token):
            request = (
                f"GET /api/v1/invoices HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n"
                f"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
            ).encode()
            received = await asyncio.to_thread(_exchange, client.port, request)
    finally:
        server.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"only ten.\n"  # short of its length, and the connection closed
    assert b"HTTP/1.1 502" not in received
    assert b"HTTP/1.1 200 OK\r\n" not in body  # the second request was never answered


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nall of it",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"9\r\nall of it\r\n0\r\n\r\n",
    ],
    ids=["until-close", "chunked"],
)
async def test_an_http_1_0_answer_without_a_length_ends_with_the_connection(db, settings, answer):
    server, url = await _raw_upstream(answer)
    try:
        async with gateway_to(db, settings, url) as (client, token):
            request = (
                f"GET /api/v1/invoices HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            ).encode()
            received = await asyncio.wait_for(
                asyncio.to_thread(_exchange, client.port, request), WAIT
            )
    finally:
        server.close()
    assert received.startswith(b"HTTP/1.0 200") or received.startswith(b"HTTP/1.1 200")
    assert received.endswith(b"all of it")


async def test_a_client_that_leaves_lets_go_of_its_upstream_connection(db, settings):
    """aiohttp does not cancel a handler whose client has gone: a waiting request held one
    of the upstream connections until the upstream answered (57 s seen). It is let go."""
    upstream_closed = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # no answer: wait for Tollgate to close its side
        upstream_closed.set()
        writer.close()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with gateway_to(db, settings, url) as (client, token):
            _reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(
                f"GET /api/v1/invoices HTTP/1.1\r\nHost: t\r\n"
                f"Authorization: Bearer {token}\r\n\r\n".encode()
            )
            await writer.drain()
            await asyncio.sleep(0.5)
            writer.transport.abort()  # the client leaves
            await asyncio.wait_for(upstream_closed.wait(), WAIT)
    finally:
        server.close()


async def test_the_upstream_cannot_set_tollgates_cookies_nor_wait_for_a_100(db, settings):
    """Set-Cookie tg_session=... from the upstream would replace the admin's dashboard
    session on Tollgate's origin; an Expect forwarded with a body already in hand made the
    upstream request wait for a 100 Continue that some servers never send."""
    seen: list[web.Request] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request)
        await request.read()
        response = web.Response(text="ok")
        response.headers.add("Set-Cookie", "tg_session=planted; Path=/; HttpOnly")
        response.headers.add("Set-Cookie", "theme=dark; Path=/api")
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        async with gateway_to(db, settings, url) as (client, token):
            response = await client.post(
                "/api/v1/invoices", data=b"{}", headers=bearer(token) | {"Expect": "100-continue"}
            )
            assert response.status == 200
            assert response.headers.getall("Set-Cookie") == ["theme=dark; Path=/api"]
    finally:
        await server.close()
    [request] = seen
    assert "Expect" not in request.headers


async def test_a_client_that_reads_nothing_is_cut_off(db, settings):
    """The write timed out and the connection was closed, but a close waits for the buffer
    to drain, which a client that reads nothing never lets happen: it stayed open. It is
    aborted."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 8000000\r\n\r\n" + b"x" * 8_000_000
    server, url = await _raw_upstream(answer)
    try:
        async with gateway_to(db, settings, url, body_timeout=1.0) as (client, token):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.connect(("127.0.0.1", client.port))
            sock.sendall(
                f"GET /api/v1/invoices HTTP/1.1\r\nHost: t\r\n"
                f"Authorization: Bearer {token}\r\n\r\n".encode()
            )
            await asyncio.sleep(4)  # past the write timeout, reading nothing
            sock.setblocking(False)
            ended = False
            try:
                while piece := sock.recv(1 << 20):
                    assert piece
                ended = True  # the end of the stream
            except ConnectionResetError:
                ended = True
            except BlockingIOError:
                ended = False  # still open, waiting for more
            finally:
                sock.close()
            assert ended
    finally:
        server.close()


async def test_an_upstream_that_says_nothing_is_a_504_after_upstream_timeout(db, settings):
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(WAIT)  # says nothing
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with gateway_to(db, settings, url, upstream_timeout=1.0) as (client, token):
            response = await client.get("/api/v1/invoices", headers=bearer(token))
            assert response.status == 504
            assert (await response.json())["error"] == "gateway_timeout"
    finally:
        server.close()


async def test_one_callers_upstream_cookies_never_reach_another_caller_s_requests(db, settings):
    """The gateway's one client session to the upstream kept a cookie jar: the Set-Cookie
    one caller's exchange brought went with every other caller's requests, over their own
    Cookie. aiohttp's jar ignores hosts written as IP addresses, so the upstream is named
    `localhost` here, as a deployment names it."""
    async with echo_upstream() as (url, seen, _):
        named = url.replace("127.0.0.1", "localhost")

        async with gateway_to(db, settings, named) as (client, alice):
            seen_before = len(seen)
            company = await make_company(client, "Globex")
            other = await new_app(client, company, permissions=["invoices:read"])
            bob = (await cc_token(client, other))["access_token"]
            first = await client.get(
                "/api/v1/invoices",
                headers=bearer(alice) | {"X-Echo-Set-Cookie": "sid=ALICE; Path=/"},
            )
            assert first.status == 200
            assert "sid=ALICE" in first.headers.get("Set-Cookie", "")
            client.session.cookie_jar.clear()  # Bob is another caller: not Alice's browser
            plain = await client.get("/api/v1/invoices", headers=bearer(bob))
            own = await client.get("/api/v1/invoices", headers=bearer(bob) | {"Cookie": "sid=BOB"})
            assert plain.status == own.status == 200
            *_, without, with_own = seen[seen_before:]
            assert "Cookie" not in without.headers
            assert without.headers["X-Tollgate-Client"] == other["client_id"]
            assert with_own.headers.getall("Cookie") == ["sid=BOB"]


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"])
async def test_a_method_override_does_not_reach_the_upstream(db, settings, header):
    """The permission was decided for the request's method; an upstream that honours an
    override would run a DELETE checked as a POST."""
    async with echo_upstream() as (url, seen, _), gateway_to(db, settings, url) as (client, token):
        response = await client.post(
            "/api/v1/invoices/7", headers=bearer(token) | {header: "DELETE"}, data=b"{}"
        )
        assert response.status == 200
        [request] = seen
        assert request.method == "POST"
        assert header not in request.headers


async def test_a_proxied_answer_and_the_upstream_carry_the_request_id(db, settings):
    async with echo_upstream() as (url, seen, _), gateway_to(db, settings, url) as (client, token):
        response = await client.get("/api/v1/invoices", headers=bearer(token))
        assert response.status == 200
        made = response.headers["X-Request-Id"]
        [request] = seen
        assert request.headers["X-Request-Id"] == made
        given = await client.get(
            "/api/v1/invoices", headers=bearer(token) | {"X-Request-Id": "caller-7"}
        )
        assert given.headers["X-Request-Id"] == "caller-7"
        assert seen[-1].headers.getall("X-Request-Id") == ["caller-7"]


async def _exchange_raw(port: int, head: bytes, body: bytes | None = None) -> list[bytes]:
    """The status lines a raw HTTP/1.1 client reads: the first one, then (after sending
    `body`) the next."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        lines = [await asyncio.wait_for(reader.readline(), WAIT)]
        if body is not None:
            await asyncio.wait_for(reader.readline(), WAIT)  # the blank line after the 100
            writer.write(body)
            await writer.drain()
            lines.append(await asyncio.wait_for(reader.readline(), WAIT))
        return lines
    finally:
        writer.close()


def _post_head(token: str, length: int) -> bytes:
    return (
        f"POST /api/v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()


async def test_100_continue_only_once_the_request_may_send_its_body(db, settings):
    """RFC 9110 §10.1.1: a final status known from the header section is sent instead of
    a 100. Before, a bogus token or a body over the limit was invited to upload it."""
    async with (
        echo_upstream() as (url, _, bodies),
        gateway_to(db, settings, url) as (
            client,
            token,
        ),
    ):
        port = client.port
        bogus = "tgat_" + "A" * 49
        [refused] = await _exchange_raw(port, _post_head(bogus, 100_000))
        assert refused.startswith(b"HTTP/1.1 401"), refused
        [too_large] = await _exchange_raw(port, _post_head(token, 100_000_000))
        assert too_large.startswith(b"HTTP/1.1 413"), too_large
        invited, answered = await _exchange_raw(port, _post_head(token, 2), body=b"{}")
        assert invited.startswith(b"HTTP/1.1 100"), invited
        assert answered.startswith(b"HTTP/1.1 200"), answered
        assert bodies == [b"{}"]
