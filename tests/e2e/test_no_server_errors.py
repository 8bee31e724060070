"""No request can cause a 500: every route, hit with malformed methods, bodies, headers
and parameters, answers 2xx/3xx/4xx."""

from __future__ import annotations

import itertools
import random
import re

import pytest
from aiohttp import web

from tests.e2e.lifecycle_helpers import sign_in
from tests.e2e.oauth_helpers import basic, cc_token, new_app

BODIES = [
    (b"", None),
    (b"{", "application/json"),
    (b"[]", "application/json"),
    (b'{"a": 1}', "application/json"),
    (b'{"name": null, "grant_type": 7}', "application/json"),
    (b"\xff\xfe\x00garbage", "application/json"),
    (b"a=1&a=2&grant_type=client_credentials", "application/x-www-form-urlencoded"),
    (b"%%%=%%%", "application/x-www-form-urlencoded"),
    (b"--x\r\nContent-Disposition: form-data\r\n\r\n--x--", "multipart/form-data; boundary=x"),
    (b"--nope", "multipart/form-data"),
    (b"x" * 20000, "text/plain"),
]
HEADERS = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Basic ####"},
    {"Authorization": "Basic " + "QQ==" * 300},
    {"Authorization": "Negotiate abc"},
    {"If-Match": "not-a-version"},
    {"X-Forwarded-For": "not an address, ::1, 999.1.1.1"},
    {"Cookie": "tg_session=" + "x" * 64 + "; tg_login_csrf=y"},
]


@pytest.mark.parametrize("seed", [5, 6, 7, 8])
async def test_malformed_requests_never_get_a_500(client, company, seed):
    app = await new_app(client, company)
    token = (await cc_token(client, app))["access_token"]
    paths = [
        "/oauth/token", "/oauth/revoke", "/oauth/introspect", "/oauth/authorize",
        "/oauth/authorize?client_id=" + app["client_id"] + "&response_type=code&redirect_uri=%ff",
        "/oauth/authorize?client_id=%00&redirect_uri=x&x=1&x=2", "/oauth/login",
        "/.well-known/oauth-authorization-server", "/api/v1/whoami", "/api/v1/invoices/%2e%2e/x",
        "/policy/check", "/admin/applications", f"/admin/applications/{app['client_id']}",
        f"/admin/applications/{app['client_id']}/rotate-secret", "/admin/users", "/admin/keys",
        "/admin/keys/x", "/admin/connections", "/admin/connections/x",
        "/admin/events?after=-1&limit=x&type=Nope", "/session", "/dashboard", "/dashboard/login",
        "/healthz", "/readyz", "/metrics", "/nope",
    ]  # fmt: skip
    paths += [p for p in every_route(client.app, app["client_id"]) if p not in paths]
    # a dashboard session with its CSRF token, so that forms get past the token check
    signed = await sign_in(client, company.admin_email, company.admin_password)
    auths = [{}, company.auth, basic(app["client_id"], app["client_secret"]),
             {"Authorization": f"Bearer {token}"}, signed.change]  # fmt: skip
    form = (f"csrf_token={signed.csrf}&name=%00&role=owner&email=x%40&ip_allowlist=0.0.0.0/0"
            "&permissions=nope&grant_type=implicit&redirect_uri=javascript:x&label=" + "x" * 300,
            "application/x-www-form-urlencoded")  # fmt: skip
    rng = random.Random(seed)
    combos = list(itertools.product(paths, ["GET", "POST", "PATCH", "DELETE", "PUT"]))
    seen = 0
    for path, method in combos:
        body, ctype = rng.choice([*BODIES, (form[0].encode(), form[1])])
        headers = rng.choice(HEADERS) | rng.choice(auths)
        if ctype:
            headers = headers | {"Content-Type": ctype}
        response = await client.request(
            method, path, data=body, headers=headers, allow_redirects=False
        )
        text = await response.text()
        assert response.status < 500, (
            method,
            path,
            headers,
            body[:80],
            response.status,
            text[:300],
        )
        seen += 1
    assert seen == len(combos)


def every_route(app: web.Application, client_id: str) -> list[str]:
    """Every path the router knows, its variables filled (an existing client_id where one
    is asked for, else a value nothing has): the sweep covers routes added later too."""
    paths = []
    for resource in app.router.resources():
        info = resource.get_info()
        template = info.get("path") or info.get("formatter")
        if template is None:
            continue
        paths.append(
            re.sub(r"\{([^}:]+)[^}]*\}",
                   lambda m: client_id if m.group(1) == "client_id" else "x", template)
        )  # fmt: skip
    return list(dict.fromkeys(paths))  # one resource per method may share a path


async def raw_request(client, request: bytes) -> int:
    """Bytes on the wire, as a client that is not aiohttp may send them."""
    import asyncio

    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(request)
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


@pytest.mark.parametrize(
    ("path", "header"),
    [
        ("/oauth/token", b"Authorization: Basic \xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"),
        ("/oauth/introspect", b"Authorization: Bearer \xff\xfe"),
        ("/policy/check", b"Authorization: Bearer \xff\xfe"),
        ("/admin/applications", b"Cookie: tg_session=" + b"a" * 40 + b"\xff"),
        ("/oauth/authorize?client_id=x", b"Cookie: tg_session=" + b"a" * 40 + b"\xff"),
    ],
)
async def test_header_bytes_that_are_not_utf8_get_a_4xx(client, path, header):
    method = b"GET" if "authorize" in path else b"POST"
    body = b"grant_type=client_credentials&token=x"
    request = (
        method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    assert 400 <= await raw_request(client, request) < 500


async def test_json_nested_deeper_than_the_parser_follows_is_a_400_at_every_route(client, company):
    """msgspec refuses nesting past its depth with a RecursionError, not a DecodeError: a
    body of brackets well under the size limit once reached the admin API as a 500."""
    app = await new_app(client, company)
    nested = b'{"keys": [{"kty": ' + b"[" * 30000 + b"]" * 30000 + b"}]}"
    signed = await sign_in(client, company.admin_email, company.admin_password)
    for path in every_route(client.app, app["client_id"]):
        for method in ("POST", "PATCH", "PUT"):
            headers = company.auth | signed.change | {"Content-Type": "application/json"}
            response = await client.request(
                method, path, data=nested, headers=headers, allow_redirects=False
            )
            assert response.status < 500, (method, path, response.status, await response.text())
    keys = f"/admin/applications/{app['client_id']}/keys"
    response = await client.post(
        keys, data=nested, headers=company.auth | {"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert "nested too deeply" in (await response.json())["error_description"]
