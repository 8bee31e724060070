"""GET /openapi.json: served, valid OpenAPI 3.1, and naming every route the app has, so a
route added without its documentation fails here."""

from __future__ import annotations

import json
from importlib import resources

import schemathesis

from service.web.middleware import UNMATCHED_PATH, canonical
from tests.contract import openapi_document

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
GATEWAY = "/api/{path}"  # every method, proxied: only its built-in whoami is Tollgate's own


async def _served(client) -> dict:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    return json.loads(await response.read())


async def test_the_document_is_served_and_is_valid_openapi_3_1(client):
    document = await _served(client)
    assert document["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(document).validate()  # raises on a schema violation
    shipped = resources.files("service.web").joinpath("openapi.json").read_bytes()
    assert document == json.loads(shipped)


async def test_every_registered_route_is_documented_and_nothing_else(client):
    document = await _served(client)
    documented = {
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }
    registered = set()
    for route in client.app.router.routes():
        path = route.resource.canonical if route.resource is not None else None
        if path is None or route.method == "HEAD":  # aiohttp adds HEAD to every GET
            continue
        if path == canonical(UNMATCHED_PATH):  # what no route matches: 404 or 405
            continue
        if path == GATEWAY:
            assert any(p.startswith("/api/") for p, _ in documented), "document the gateway"
            continue
        registered.add((path, route.method))
    assert registered - documented == set(), "routes without documentation"
    gateway_paths = {(p, m) for p, m in documented if p.startswith("/api/")}
    assert documented - gateway_paths - registered == set(), "documented but not routed"


def test_the_shipped_document_is_the_one_the_builder_makes():
    """Request schemas come from the handlers' Structs: change one, and this fails until
    `python -m tests.contract.openapi_document` writes the file again."""
    shipped = resources.files("service.web").joinpath("openapi.json").read_text("utf-8")
    assert shipped == openapi_document.render(), (
        "service/web/openapi.json is stale: run .venv/bin/python -m tests.contract.openapi_document"
    )


def test_request_schemas_hold_the_handlers_limits():
    schemas = openapi_document.build()["components"]["schemas"]
    application = schemas["ApplicationIn"]
    assert application["additionalProperties"] is False  # forbid_unknown_fields
    assert application["properties"]["grant_type"]["enum"] == [
        "authorization_code",
        "client_credentials",
    ]
    assert application["properties"]["permissions"]["maxItems"] == 200
    assert schemas["CheckIn"]["properties"]["token"]["maxLength"] == 200
    assert schemas["UserIn"]["properties"]["role"]["enum"] == ["admin", "member"]
