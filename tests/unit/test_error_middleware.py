"""The request observer's errors, through aiohttp's real stack: an unreachable database is a
503 the client may retry; anything else unexpected is a 500 that says nothing more."""

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service.eventlog import EventLogRefused, EventLogUnavailable
from service.web.middleware import canonical, observed_routes, route_unmatched


async def serve(exc: Exception) -> TestClient:
    async def handler(_request: web.Request) -> web.Response:
        raise exc

    app = web.Application()
    app.add_routes(observed_routes([web.route("*", "/boom", handler)]))
    route_unmatched(app)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def test_an_unreachable_database_is_a_503_not_a_500():
    client = await serve(EventLogUnavailable("connection refused"))
    try:
        response = await client.get("/boom")
        assert response.status == 503
        assert (await response.json())["error"] == "temporarily_unavailable"
    finally:
        await client.close()


async def test_a_value_the_database_refuses_is_a_400_not_a_503():
    import asyncpg

    for exc in (
        EventLogRefused("invalid byte sequence for encoding UTF8: 0x00"),
        asyncpg.CharacterNotInRepertoireError("invalid byte sequence for encoding UTF8: 0x00"),
    ):
        client = await serve(exc)
        try:
            response = await client.get("/boom")
            assert response.status == 400
            body = await response.json()
            assert body["error"] == "invalid_request"
            assert "0x00" not in body["error_description"]  # says nothing of the internals
        finally:
            await client.close()


async def test_anything_else_unexpected_is_a_500_without_details():
    client = await serve(KeyError("internal detail"))
    try:
        response = await client.get("/boom")
        assert response.status == 500
        assert await response.json() == {
            "error": "server_error",
            "error_description": "internal error",
        }
    finally:
        await client.close()


async def test_a_connection_error_that_is_not_the_client_leaving_is_still_a_503():
    # aiohttp sets the client's disconnect on the body stream; a ConnectionError from
    # anywhere else (the database's socket) is the database's trouble, not the client's.
    client = await serve(ConnectionResetError("Connection reset by peer"))
    try:
        response = await client.post("/boom", data=b"a body that was read in full")
        assert response.status == 503
        assert (await response.json())["error"] == "temporarily_unavailable"
    finally:
        await client.close()


async def test_every_way_the_database_fails_to_serve_is_a_503_with_retry_after():
    import asyncpg

    for exc in (
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.DiskFullError("could not extend file: No space left on device"),
        asyncpg.LockNotAvailableError("canceling statement due to lock timeout"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.InternalClientError("connection lost"),
        TimeoutError(),
    ):
        client = await serve(exc)
        try:
            response = await client.get("/boom")
            assert response.status == 503, type(exc).__name__
            assert response.headers["Retry-After"].isdigit()
            assert (await response.json())["error"] == "temporarily_unavailable"
        finally:
            await client.close()


async def test_a_database_error_that_is_a_bug_stays_a_500():
    import asyncpg

    client = await serve(asyncpg.UndefinedColumnError('column "nope" does not exist'))
    try:
        response = await client.get("/boom")
        assert response.status == 500
        assert (await response.json())["error"] == "server_error"
    finally:
        await client.close()


async def test_what_no_route_matches_is_a_json_404_and_another_method_a_405_with_allow():
    client = await serve(KeyError("never raised"))
    try:
        missing = await client.get("/no/such/path")
        assert missing.status == 404
        assert (await missing.json())["error"] == "not_found"
        assert missing.headers["X-Request-Id"]
    finally:
        await client.close()

    async def handler(_request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.add_routes(observed_routes([web.get("/thing", handler), web.put("/thing", handler)]))
    route_unmatched(app)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        wrong = await client.delete("/thing")
        assert wrong.status == 405
        assert (await wrong.json())["error"] == "method_not_allowed"
        assert set(wrong.headers["Allow"].split(",")) == {"GET", "HEAD", "PUT"}
        assert (await client.head("/thing")).status == 200  # a GET route answers HEAD
    finally:
        await client.close()


def test_requests_are_counted_under_the_path_as_aiohttp_names_its_resource():
    assert canonical("/healthz") == "/healthz"
    assert canonical("/api/{path:.*}") == "/api/{path}"
    assert canonical("/admin/applications/{client_id}") == "/admin/applications/{client_id}"
    assert canonical(r"/v/{n:\d{2,3}}/x") == "/v/{n}/x"


async def test_a_path_with_a_line_break_is_still_answered_in_json():
    client = await serve(KeyError("never raised"))
    try:
        missing = await client.get("/no/such%0Apath")
        assert missing.status == 404
        assert (await missing.json())["error"] == "not_found"
    finally:
        await client.close()
