"""GET /openapi.json: the OpenAPI 3.1 document of the HTTP interface, served as shipped."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from service.web.middleware import expectation, observed

DOCUMENT = web.AppKey("openapi_document", bytes)


def setup(app: web.Application) -> None:
    """Read the document once, at start (a wheel without it fails here, not on a request),
    and route it."""
    app[DOCUMENT] = resources.files("service.web").joinpath("openapi.json").read_bytes()
    app.router.add_get(
        "/openapi.json", observed(serve, "/openapi.json"), expect_handler=expectation
    )


async def serve(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOCUMENT], content_type="application/json")
