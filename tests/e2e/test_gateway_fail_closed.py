"""The gateway fails closed (SPEC §3): what no route rule covers is refused, and the rules
read a path the way an upstream that routes like Rails does (any case, a format suffix),
so no spelling of a path reaches a resource the token has no permission for."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from service.app import create_app
from service.domain.permissions import DEFAULT_CATALOGUE
from service.domain.routes import RouteRule, RoutesError, load_routes
from service.storage.database import Database
from tests.conftest import make_company
from tests.e2e.oauth_helpers import cc_token, new_app


class RailsLikeApi:
    """An upstream API that routes as Rails apps commonly do: the path in any case, a
    `.format` suffix on the last segment, `;` parameters dropped from a segment, members
    under their collection, and WebDAV's PROPFIND answered anywhere. It notes what it
    served: a refused request must never reach it."""

    ROUTES = {
        ("GET", "/api/v1/invoices"): "invoices#index",
        ("POST", "/api/v1/invoices"): "invoices#create",
        ("GET", "/api/v2/invoices"): "v2/invoices#index",
        ("GET", "/api/v1/reports"): "reports#index",
        ("GET", "/api/v1/status"): "status#show",
        ("POST", "/api/v1/status"): "status#update",
        ("GET", "/api/v1/whoami"): "upstream#whoami",
    }

    def __init__(self) -> None:
        self.served: list[str] = []
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        segments = [s.partition(";")[0] for s in request.path.lower().split("/")]
        segments[-1], _, fmt = segments[-1].partition(".")
        action = None
        if request.method == "PROPFIND":
            action = "dav#propfind"
        for n in (len(segments), len(segments) - 1):
            found = self.ROUTES.get((request.method, "/".join(segments[:n])))
            if action is None and found is not None:
                action = found if n == len(segments) else found.replace("index", "show")
        if action is None:
            return web.json_response({"error": "no route"}, status=404)
        self.served.append(action)
        status = 207 if action == "dav#propfind" else 200
        return web.json_response({"action": action, "format": fmt or "html"}, status=status)

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return str(self.server.make_url("")).rstrip("/")

    async def __aexit__(self, *_exc: object) -> None:
        assert self.server is not None
        await self.server.close()


@pytest.fixture
async def rails() -> RailsLikeApi:
    api = RailsLikeApi()
    async with api:
        yield api


@pytest.fixture
def settings(settings, rails):
    assert rails.server is not None
    return dataclasses.replace(settings, upstream_url=str(rails.server.make_url("")).rstrip("/"))


async def send(client: TestClient, method: str, path: str, token: str) -> aiohttp.ClientResponse:
    """The path exactly as written (no client-side quoting or normalising)."""
    url = URL(str(client.make_url("")).rstrip("/") + path, encoded=True)
    headers = {"Authorization": f"Bearer {token}"}
    return await client.session.request(method, url, headers=headers)


ATTEMPTS = [
    ("GET", "/api/v1/invoices.json", "invoices#index"),
    ("POST", "/api/v1/invoices.json", "invoices#create"),
    ("GET", "/api/v1/Invoices", "invoices#index"),
    ("GET", "/api/v1/INVOICES/7.xml", "invoices#show"),
    ("GET", "/api/v2/invoices", "v2/invoices#index"),
    ("PROPFIND", "/api/v1/reports", "dav#propfind"),
]


@pytest.mark.parametrize(("method", "path", "action"), ATTEMPTS)
async def test_a_reports_token_reaches_no_other_resource_however_the_request_is_spelt(
    client, company, rails, method, path, action
):
    app = await new_app(client, company, permissions=["reports:read"])
    token = (await cc_token(client, app))["access_token"]
    async with aiohttp.ClientSession() as direct:  # what the upstream would have done
        served = await direct.request(method, URL(rails.server.make_url("")).with_path(path))
        assert (await served.json())["action"] == action
    rails.served.clear()
    response = await send(client, method, path, token)
    assert response.status == 403, await response.text()
    assert (await response.json())["error"] == "insufficient_scope"
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    assert rails.served == []


@pytest.mark.parametrize(
    "path", ["/api/v1/invoices;x=1", "/api/v1/invoices%3Bx=1", "/api/v1/reports/7;jsessionid=1"]
)
async def test_path_parameters_are_refused_before_they_reach_the_upstream(
    client, company, rails, path
):
    app = await new_app(client, company, permissions=["reports:read", "invoices:read"])
    token = (await cc_token(client, app))["access_token"]
    response = await send(client, "GET", path, token)
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"
    assert rails.served == []


async def test_a_token_reaches_its_own_resource_in_any_spelling_and_nothing_beside_it(
    client, company, rails
):
    app = await new_app(client, company, permissions=["reports:read"])
    token = (await cc_token(client, app))["access_token"]
    for path in ("/api/v1/reports", "/api/v1/Reports.json", "/api/v1/reports/7.csv"):
        response = await send(client, "GET", path, token)
        assert response.status == 200, (path, await response.text())
    assert rails.served == ["reports#index", "reports#index", "reports#show"]
    assert (await send(client, "GET", "/api/v1/Invoices.json", token)).status == 403
    assert rails.served == ["reports#index", "reports#index", "reports#show"]


async def test_whoami_is_tollgates_own_even_with_an_upstream_and_refuses_other_methods(
    client, company, rails
):
    app = await new_app(client, company, permissions=["reports:read"])
    token = (await cc_token(client, app))["access_token"]
    mine = await send(client, "GET", "/api/v1/whoami", token)
    assert mine.status == 200
    assert (await mine.json())["client_id"] == app["client_id"]
    posted = await send(client, "POST", "/api/v1/whoami", token)
    assert posted.status == 405
    assert set(posted.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
    assert (await posted.json())["error"] == "method_not_allowed"
    assert rails.served == []


async def start(db, settings, **overrides) -> TestClient:
    app = create_app(dataclasses.replace(settings, **overrides), database=Database(db.dsn, db.pool))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def test_without_an_upstream_an_uncovered_path_is_refused_and_whoami_405s(db, settings):
    client = await start(db, settings, upstream_url=None)
    try:
        company = await make_company(client)
        app = await new_app(client, company, permissions=["reports:read"])
        token = (await cc_token(client, app))["access_token"]
        uncovered = await send(client, "GET", "/api/v9/anything", token)
        assert uncovered.status == 403
        assert (await uncovered.json())["error"] == "insufficient_scope"
        assert (await send(client, "GET", "/api/v1/reports", token)).status == 404  # no upstream
        for method in ("POST", "DELETE", "PUT"):
            refused = await send(client, method, "/api/v1/whoami", token)
            assert refused.status == 405, method
            assert "GET" in refused.headers["Allow"]
        assert (await send(client, "GET", "/api/v1/WhoAmI", token)).status == 200
    finally:
        await client.close()


def routes_file(tmp_path: Path, rules: list[dict]) -> Path:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(rules))
    return path


async def test_a_public_route_needs_a_valid_token_from_an_allowed_address_but_no_permission(
    db, settings, tmp_path, rails
):
    path = routes_file(tmp_path, [
        {"prefix": "/api/v1/status", "public": True, "methods": ["GET"]},
        {"prefix": "/api/v1/reports", "permission": "reports:read", "methods": ["GET"]},
    ])  # fmt: skip
    client = await start(db, settings, routes_file=path)
    try:
        company = await make_company(client)
        app = await new_app(client, company, permissions=["invoices:read"])
        token = (await cc_token(client, app))["access_token"]
        assert (await send(client, "GET", "/api/v1/Status.json", token)).status == 200
        assert rails.served == ["status#show"]
        # only what the file declares: the method it did not name, and the invoices route
        # the catalogue would have derived, are refused
        for method, uncovered in (("POST", "/api/v1/status"), ("GET", "/api/v1/invoices")):
            refused = await send(client, method, uncovered, token)
            assert refused.status == 403, uncovered
            assert (await refused.json())["error"] == "insufficient_scope"
        anonymous = await client.get("/api/v1/status")
        assert anonymous.status == 401
        assert rails.served == ["status#show"]
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("rule", "complaint"),
    [
        ({"prefix": "/api/v1/status"}, "public"),
        ({"prefix": "/api/v1/status", "public": True, "permission": "reports:read"}, "names no"),
        ({"prefix": "/api/v1/invoices.json", "permission": "invoices:read"}, "prefix"),
        ({"prefix": "/api/v1/a;b", "permission": "invoices:read"}, "prefix"),
        ({"prefix": "/v1/invoices", "permission": "invoices:read"}, "prefix"),
        ({"prefix": "/api/v1/x", "public": True, "methods": ["PROPFIND"]}, "methods"),
        ({"prefix": "/api/v1/WhoAmI", "permission": "invoices:read"}, "Tollgate's own"),
    ],
)
def test_a_routes_file_that_could_open_a_hole_stops_the_start(tmp_path, rule, complaint):
    with pytest.raises(RoutesError, match=complaint):
        load_routes(routes_file(tmp_path, [rule]), DEFAULT_CATALOGUE)


def test_the_longest_matching_rule_decides_in_any_case_and_format():
    table = load_routes(None, DEFAULT_CATALOGUE)
    assert table.rule_for("GET", "/api/v1/Invoices.json") == RouteRule(
        prefix="/api/v1/invoices", permission="invoices:read",
        methods=frozenset({"GET", "HEAD", "OPTIONS"}),
    )  # fmt: skip
    assert table.rule_for("POST", "/api/v1/invoices/7.json").permission == "invoices:write"
    assert table.rule_for("GET", "/api/v1/invoicesx") is None
    assert table.rule_for("PROPFIND", "/api/v1/invoices") is None
    assert table.rule_for("GET", "/api/v2/invoices") is None
