"""The one error middleware, through aiohttp's real stack: an unreachable database is a
503 the client may retry; anything else unexpected is a 500 that says nothing more."""

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service.eventlog import EventLogRefused, EventLogUnavailable
from service.web.middleware import error_middleware


async def serve(exc: Exception) -> TestClient:
    async def handler(_request: web.Request) -> web.Response:
        raise exc

    app = web.Application(middlewares=[error_middleware])
    app.router.add_route("*", "/boom", handler)
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
