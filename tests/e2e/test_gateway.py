"""The gateway and /policy/check over HTTP: tokens, real source addresses, trusted
proxies, revocation on violation (once), permissions, and the upstream proxy."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import socket
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from service.app import CONTEXT, create_app
from service.commands.directory import register_resource_server
from service.eventlog import Metadata
from service.storage.database import Database
from tests.conftest import make_company
from tests.e2e.oauth_helpers import basic, cc_token, new_app


async def start(db, settings, host: str = "127.0.0.1", **overrides) -> TestClient:
    app = create_app(dataclasses.replace(settings, **overrides), database=Database(db.dsn, db.pool))
    client = TestClient(TestServer(app, host=host))
    await client.start_server()
    return client


def from_address(client: TestClient, address: str) -> aiohttp.ClientSession:
    """A real client socket bound to `address` (127.0.0.2 is another loopback address)."""
    return aiohttp.ClientSession(
        base_url=str(client.make_url("")), connector=aiohttp.TCPConnector(local_addr=(address, 0))
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def count(db, type_: str) -> int:
    return await db.pool.fetchval("SELECT count(*) FROM events WHERE type = $1", type_)


async def test_whoami_with_a_valid_token(client, company):
    app = await new_app(
        client, company, ip_allowlist=["127.0.0.1/32"], permissions=["invoices:read"]
    )
    token = (await cc_token(client, app))["access_token"]
    response = await client.get("/api/v1/whoami", headers=bearer(token))
    assert response.status == 200
    assert await response.json() == {
        "company_id": company.company_id,
        "client_id": app["client_id"],
        "permissions": ["invoices:read"],
        "expires_at": None,
    }


@pytest.mark.parametrize(
    ("headers", "attempted"),
    [
        ({}, False),
        ({"Authorization": "Basic abc"}, False),  # another scheme: no Bearer attempt
        ({"Authorization": "Bearer nonsense"}, True),
        ({"Authorization": "Bearer tgat_" + "A" * 49}, True),
    ],
)
async def test_missing_malformed_or_unknown_tokens_get_401(client, headers, attempted):
    """RFC 6750 §3.1: the challenge names an error only when a Bearer token was tried."""
    response = await client.get("/api/v1/whoami", headers=headers)
    assert response.status == 401
    assert (await response.json())["error"] == "invalid_token"
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="tollgate"')
    assert ('error="invalid_token"' in challenge) is attempted


async def test_a_valid_token_from_outside_the_allow_list_is_revoked(client, company, db):
    app = await new_app(client, company, ip_allowlist=["127.0.0.1/32"])
    token = (await cc_token(client, app))["access_token"]
    async with from_address(client, "127.0.0.2") as outsider:
        response = await outsider.get("/api/v1/whoami", headers=bearer(token))
        assert response.status == 403
        assert (await response.json())["error"] == "ip_not_allowed"
    [revoked] = await db.pool.fetch("SELECT * FROM events WHERE type = 'TokenRevoked'")
    payload = json.loads(revoked["payload"])
    assert payload["reason"] == "ip_violation"
    assert payload["ip"] == "127.0.0.2"
    [violation] = await db.pool.fetch("SELECT * FROM events WHERE type = 'IpViolationDetected'")
    assert json.loads(violation["payload"])["token_revoked"] is True
    assert json.loads(violation["payload"])["endpoint"] == "api"
    # from then on 401 everywhere, the allowed address included
    again = await client.get("/api/v1/whoami", headers=bearer(token))
    assert again.status == 401
    assert (await again.json())["error"] == "invalid_token"


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/api/v1//whoami", []),
        ("/api/v1/./whoami", []),
        ("/api/v1/whoami;x=1", []),
        ("/api/v1/%2fwhoami", []),
        ("/api/v1/whoami", [("DPoP", "a.b.c"), ("DPoP", "d.e.f")]),  # two proofs
    ],
    ids=["empty-segment", "dot-segment", "path-parameters", "encoded-slash", "two-dpop-headers"],
)
async def test_a_token_from_outside_the_allow_list_is_revoked_however_the_request_is_refused(
    client, company, db, path, extra
):
    """SPEC §2: the token and the allow list come first; a path the gateway refuses, or a
    malformed proof, does not spare a stolen token used from elsewhere."""
    app = await new_app(client, company, ip_allowlist=["127.0.0.1/32"])
    token = (await cc_token(client, app))["access_token"]
    scheme = "DPoP" if extra else "Bearer"
    async with from_address(client, "127.0.0.2") as outsider:
        url = URL(str(client.make_url("")).rstrip("/") + path, encoded=True)
        response = await outsider.get(url, headers=[("Authorization", f"{scheme} {token}"), *extra])
        assert response.status == 403, await response.text()
        assert (await response.json())["error"] == "ip_not_allowed"
    assert await count(db, "TokenRevoked") == 1
    # and from the allowed address, the same refusal as before, now for a revoked token
    url = URL(str(client.make_url("")).rstrip("/") + path, encoded=True)
    again = await client.session.get(url, headers=[("Authorization", f"{scheme} {token}"), *extra])
    assert again.status == 401


async def test_concurrent_requests_from_a_bad_address_revoke_once(client, company, db):
    app = await new_app(client, company, ip_allowlist=["127.0.0.1/32"])
    token = (await cc_token(client, app))["access_token"]
    async with from_address(client, "127.0.0.2") as outsider:
        responses = await asyncio.gather(
            *(outsider.get("/api/v1/whoami", headers=bearer(token)) for _ in range(20))
        )
        statuses = [r.status for r in responses]
    assert set(statuses) <= {401, 403}
    assert 403 in statuses
    assert await count(db, "TokenRevoked") == 1
    assert await count(db, "IpViolationDetected") == 1


async def test_a_forged_forwarded_header_from_an_untrusted_peer_changes_nothing(
    client, company, db
):
    app = await new_app(client, company, ip_allowlist=["127.0.0.1/32"])
    token = (await cc_token(client, app))["access_token"]
    async with from_address(client, "127.0.0.2") as outsider:
        response = await outsider.get(
            "/api/v1/whoami", headers=bearer(token) | {"X-Forwarded-For": "127.0.0.1"}
        )
    assert response.status == 403
    assert (
        json.loads(
            await db.pool.fetchval("SELECT payload FROM events WHERE type = 'IpViolationDetected'")
        )["ip"]
        == "127.0.0.2"
    )


async def test_trusted_proxies_forward_the_right_most_untrusted_address(db, settings):
    client = await start(db, settings, trusted_proxies=(ipaddress.ip_network("127.0.0.0/30"),))
    try:
        company = await make_company(client)
        app = await new_app(client, company, ip_allowlist=["198.51.100.0/24"])
        # the token endpoint sees the forwarded address too
        response = await client.post(
            "/oauth/token",
            data={"grant_type": "client_credentials"},
            headers=basic(app["client_id"], app["client_secret"])
            | {"X-Forwarded-For": "198.51.100.7"},
        )
        assert response.status == 200
        token = (await response.json())["access_token"]
        ok = await client.get(
            "/api/v1/whoami", headers=bearer(token) | {"X-Forwarded-For": "198.51.100.7, 127.0.0.2"}
        )
        assert ok.status == 200  # 127.0.0.2 is a trusted hop; 198.51.100.7 is the client
        spoofed = await client.get(
            "/api/v1/whoami",
            headers=bearer(token) | {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"},
        )
        assert spoofed.status == 403  # the right-most untrusted entry is what counts
        violation = json.loads(
            await db.pool.fetchval("SELECT payload FROM events WHERE type = 'IpViolationDetected'")
        )
        assert violation["ip"] == "203.0.113.9"
    finally:
        await client.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_addresses_and_ranges(db, settings):
    client = await start(db, settings, host="::1")
    try:
        company = await make_company(client)
        inside = await new_app(client, company, ip_allowlist=["::1"], name="v6 in")
        wide = await new_app(client, company, ip_allowlist=["::/127"], name="v6 range")
        outside = await new_app(
            client, company, ip_allowlist=["2001:db8::/32", "127.0.0.1"], name="v6 out"
        )
        for app, status in ((inside, 200), (wide, 200), (outside, 403)):
            token = (await cc_token(client, app))["access_token"] if status == 200 else None
            if token is None:
                response = await client.post(
                    "/oauth/token",
                    data={"grant_type": "client_credentials"},
                    headers=basic(app["client_id"], app["client_secret"]),
                )
                assert response.status == 403  # the token endpoint enforces it too
                continue
            assert (await client.get("/api/v1/whoami", headers=bearer(token))).status == status
    finally:
        await client.close()


async def test_a_route_needs_its_permission(client, company):
    app = await new_app(client, company, ip_allowlist=["127.0.0.1"], permissions=["invoices:read"])
    token = (await cc_token(client, app))["access_token"]
    response = await client.post("/api/v1/invoices", headers=bearer(token), json={})
    assert response.status == 403
    assert (await response.json())["error"] == "insufficient_scope"
    assert 'scope="invoices:write"' in response.headers["WWW-Authenticate"]
    assert (await client.get("/api/v1/whoami", headers=bearer(token))).status == 200


async def test_a_token_issued_by_another_process_is_accepted_at_once(client, company, db, settings):
    app = await new_app(client, company, ip_allowlist=["127.0.0.1"])
    other = await start(db, settings)
    try:
        token = (await cc_token(other, app))["access_token"]
        assert (await client.get("/api/v1/whoami", headers=bearer(token))).status == 200
    finally:
        await other.close()


#: what many servers (CGI, WSGI) read as X-Tollgate-Company and the rest, and the address
#: headers: the caller's own, forged
SMUGGLED = {"X_Tollgate_Company": "forged", "x_tollgate_permissions": "admin:write",
            "Forwarded": "for=192.0.2.9", "X-Real-IP": "192.0.2.9", "X_Forwarded_For": "9",
            "True-Client-IP": "192.0.2.9"}  # fmt: skip


async def test_the_upstream_gets_the_request_and_identity_headers(db, settings):
    seen: dict = {}

    async def echo(request: web.Request) -> web.StreamResponse:
        seen["headers"] = dict(request.headers)
        seen["body"] = await request.read()
        seen["path"] = request.path_qs
        response = web.StreamResponse(status=207, headers={"X-Upstream": "yes"})
        await response.prepare(request)
        for _ in range(16):
            await response.write(b"x" * 65536)
        await response.write_eof()
        return response

    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", echo)
    upstream = TestServer(upstream_app, host="127.0.0.1")
    await upstream.start_server()
    client = await start(db, settings, upstream_url=str(upstream.make_url("")).rstrip("/"))
    try:
        company = await make_company(client)
        app = await new_app(
            client,
            company,
            ip_allowlist=["127.0.0.1"],
            permissions=["invoices:read", "invoices:write"],
        )
        token = (await cc_token(client, app))["access_token"]
        body = b"y" * 300_000
        response = await client.post(
            "/api/v1/invoices/7?x=1",
            data=body,
            headers=bearer(token)
            | {"X-Tollgate-Company": "forged", "X-Custom": "kept", "X-Other_Custom": "kept"}
            | SMUGGLED
            | {"Connection": "keep-alive, X-Hop-Only", "X-Hop-Only": "for Tollgate alone"},
        )
        assert response.status == 207
        assert response.headers["X-Upstream"] == "yes"
        assert len(await response.read()) == 16 * 65536
        assert seen["body"] == body
        assert seen["path"] == "/api/v1/invoices/7?x=1"
        headers = seen["headers"]
        assert headers["X-Tollgate-Company"] == company.company_id
        assert headers["X-Tollgate-Client"] == app["client_id"]
        assert headers["X-Tollgate-Permissions"] == "invoices:read invoices:write"
        assert headers["X-Custom"] == headers["X-Other_Custom"] == "kept"
        assert "Authorization" not in headers
        assert headers["X-Forwarded-For"] == "127.0.0.1"
        as_cgi_reads = [name.upper().replace("-", "_") for name in headers]
        for name in ("X_TOLLGATE_COMPANY", "X_TOLLGATE_PERMISSIONS", "X_FORWARDED_FOR"):
            assert as_cgi_reads.count(name) == 1, headers
        assert not {"FORWARDED", "X_REAL_IP", "TRUE_CLIENT_IP"} & set(as_cgi_reads), headers
        assert "X-Hop-Only" not in headers  # named in Connection: ends here (RFC 9110 §7.6.1)
    finally:
        await client.close()
        await upstream.close()


#: what a proxy in front says of the request as the client made it, forged by the caller,
#: spelled as sent and as CGI and WSGI read it
FORGED_CONTEXT = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https",
                  "X-Forwarded-Port": "443", "X-Forwarded-Prefix": "/evil",
                  "X_Forwarded_Host": "evil.example", "Front-End-Https": "on"}  # fmt: skip


async def _echo_upstream() -> tuple[TestServer, dict]:
    seen: dict = {}

    async def echo(request: web.Request) -> web.Response:
        seen["headers"] = list(request.headers.items())
        return web.Response(text="ok")

    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", echo)
    upstream = TestServer(upstream_app, host="127.0.0.1")
    await upstream.start_server()
    return upstream, seen


@pytest.mark.parametrize("trusted", [False, True], ids=["caller", "trusted-proxy"])
async def test_the_upstream_gets_the_request_context_tollgate_believes(db, settings, trusted):
    """X-Forwarded-Host and the rest, from a caller, are its own claim: an upstream that
    builds links or "secure" decisions on them would follow the caller. Tollgate passes
    on only what a trusted proxy says, and otherwise what it saw itself."""
    upstream, seen = await _echo_upstream()
    proxies = (ipaddress.ip_network("127.0.0.0/8"),) if trusted else ()
    client = await start(
        db, settings, upstream_url=str(upstream.make_url("")).rstrip("/"), trusted_proxies=proxies
    )
    try:
        company = await make_company(client)
        app = await new_app(client, company, ip_allowlist=["127.0.0.1"])
        token = (await cc_token(client, app))["access_token"]
        response = await client.get(
            "/api/v1/invoices", headers=bearer(token) | FORGED_CONTEXT | {"Host": "evil.example"}
        )
        assert response.status == 200
        as_cgi_reads: dict[str, list[str]] = {}
        for name, value in seen["headers"]:
            as_cgi_reads.setdefault(name.upper().replace("-", "_"), []).append(value)
        if trusted:  # the proxy's word, as it spelled it; its "_" spelling is no one's
            assert as_cgi_reads["X_FORWARDED_HOST"] == ["evil.example"]
            assert as_cgi_reads["X_FORWARDED_PROTO"] == ["https"]
            assert as_cgi_reads["X_FORWARDED_PREFIX"] == ["/evil"]
            assert as_cgi_reads["FRONT_END_HTTPS"] == ["on"]
        else:
            # the issuer's, never the Host the caller wrote
            issuer = urlsplit(client.app[CONTEXT].settings.issuer)
            assert as_cgi_reads["X_FORWARDED_HOST"] == [issuer.netloc]
            assert as_cgi_reads["X_FORWARDED_PROTO"] == [issuer.scheme]
            for name in ("X_FORWARDED_PORT", "X_FORWARDED_PREFIX", "FRONT_END_HTTPS"):
                assert name not in as_cgi_reads, seen["headers"]
    finally:
        await client.close()
        await upstream.close()


async def test_policy_check_for_resource_servers(client, company, db):
    app = await new_app(
        client, company, ip_allowlist=["192.0.2.0/24"], permissions=["invoices:read"]
    )
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert response.status == 403  # 127.0.0.1 may not fetch tokens for this app
    # a token issued when the app allowed everyone: widen, issue, narrow again
    path = f"/admin/applications/{app['client_id']}"
    await client.patch(
        path, json={"ip_allowlist": ["192.0.2.0/24", "127.0.0.1"]}, headers=company.auth
    )
    token = (await cc_token(client, app))["access_token"]
    await client.patch(path, json={"ip_allowlist": ["192.0.2.0/24"]}, headers=company.auth)
    _, key = await register_resource_server(client.app[CONTEXT], "billing api", Metadata())
    rs = bearer(key)
    ok = await client.post(
        "/policy/check",
        json={"token": token, "ip": "192.0.2.5", "permission": "invoices:read"},
        headers=rs,
    )
    assert ok.status == 200
    assert (await ok.json())["allow"] is True
    scope = await client.post(
        "/policy/check",
        json={"token": token, "ip": "192.0.2.5", "permission": "invoices:write"},
        headers=rs,
    )
    assert scope.status == 403
    assert (await scope.json())["error"] == "insufficient_scope"
    assert (
        await client.post("/policy/check", json={"token": token, "ip": "nope"}, headers=rs)
    ).status == 400
    for zoned in ("fe80::1%eth0", "fe80::1%\nBcc: thief@evil.example", "fe80::1%\u0000"):
        refused = await client.post("/policy/check", json={"token": token, "ip": zoned}, headers=rs)
        assert refused.status == 400, zoned  # a zone ID would reach events and email headers
        assert (await refused.json())["error"] == "invalid_request"
    assert await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'TokenRevoked'") == 0
    keyless = await client.post("/policy/check", json={"token": token, "ip": "192.0.2.5"})
    assert keyless.status == 401
    assert keyless.headers["WWW-Authenticate"] == 'Bearer realm="tollgate-policy"'
    wrong = await client.post(
        "/policy/check", json={"token": token, "ip": "192.0.2.5"}, headers=bearer("tgrs_nope")
    )
    assert wrong.status == 401
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    bad = await client.post("/policy/check", json={"token": token, "ip": "203.0.113.1"}, headers=rs)
    assert bad.status == 403
    assert (await bad.json())["error"] == "ip_not_allowed"
    gone = await client.post("/policy/check", json={"token": token, "ip": "192.0.2.5"}, headers=rs)
    assert gone.status == 401
    violation = json.loads(
        await db.pool.fetchval(
            "SELECT payload FROM events WHERE type = 'IpViolationDetected' AND payload->>'endpoint' = 'policy_check'"
        )
    )
    assert violation["ip"] == "203.0.113.1"


@pytest.mark.parametrize(
    "permission",
    ["invoices:delete", "a\r\nSet-Cookie: x=1", "x\u0000", 'x", error="invalid_token', "café"],
)
async def test_policy_check_names_only_a_permission_of_the_catalogue(
    client, company, db, permission
):
    """The permission asked about is named in the answer's challenge: one that is not the
    catalogue's (a line break in it ended the connection with no answer, a quote added a
    parameter) is the resource server's bad request, decided before the token is."""
    app = await new_app(client, company, ip_allowlist=["127.0.0.1"])
    token = (await cc_token(client, app))["access_token"]
    _, key = await register_resource_server(client.app[CONTEXT], "billing api", Metadata())
    for ip in ("127.0.0.1", "203.0.113.1"):  # inside and outside the allow list
        refused = await client.post(
            "/policy/check",
            json={"token": token, "ip": ip, "permission": permission},
            headers=bearer(key),
        )
        assert refused.status == 400
        assert (await refused.json())["error"] == "invalid_request"
    assert await count(db, "IpViolationDetected") == 0
    assert await count(db, "TokenRevoked") == 0


async def test_the_violation_path_end_to_end_sends_one_email(db, settings):
    """Gateway → revocation → the service's own notifier → a real SMTP server."""
    from tests.integration.test_notifier import SmtpServer

    smtp = SmtpServer()
    await smtp.start()
    client = await start(
        db,
        settings,
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        mail_from="tollgate@alerts.example",
    )
    try:
        company = await make_company(client)
        app = await new_app(
            client,
            company,
            ip_allowlist=["127.0.0.1/32"],
            notification_emails=["sec@acme.example", "ops@acme.example"],
        )
        token = (await cc_token(client, app))["access_token"]
        async with from_address(client, "127.0.0.2") as outsider:
            assert (await outsider.get("/api/v1/whoami", headers=bearer(token))).status == 403
        for _ in range(200):
            if smtp.mailbox.received:
                break
            await asyncio.sleep(0.05)
        [(sender, recipients, message)] = smtp.mailbox.received
        assert sender == "tollgate@alerts.example"
        assert sorted(recipients) == ["ops@acme.example", "sec@acme.example"]
        text = message.get_content()
        assert "127.0.0.2" in message["Subject"] + text
        assert "Test app" in message["Subject"] + text
        assert "revoked" in text
        assert token not in text
        await asyncio.sleep(0.3)
        assert len(smtp.mailbox.received) == 1
        assert await count(db, "ViolationNotificationSent") == 1
        metrics = await (await client.get("/metrics")).text()
        assert "tollgate_emails_sent_total 1.0" in metrics
        assert 'tollgate_ip_violations_total{endpoint="api"} 1.0' in metrics
    finally:
        await client.close()
        await smtp.stop()


@pytest.mark.parametrize("path", ["/api/v1/whoami%0a", "/api/v1/whoami%0d", "/api/v1/x%0Ay"])
async def test_a_line_break_in_the_path_is_still_the_gateways(client, company, db, path):
    """A decoded path may hold a line break, which a route's `.*` does not match: such a
    request fell through to the catch-all 404, and a valid token from outside the allow
    list was neither refused nor revoked. The token is checked first wherever it is sent."""
    from tests.e2e.test_no_server_errors import raw_request

    def get(headers: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode()

    assert await raw_request(client, get("")) == 401
    app = await new_app(client, company, ip_allowlist=["127.0.0.1"])
    token = (await cc_token(client, app))["access_token"]
    moved = await client.patch(
        f"/admin/applications/{app['client_id']}",
        json={"ip_allowlist": ["192.0.2.0/24"]},
        headers=company.auth,
    )
    assert moved.status == 200
    assert await raw_request(client, get(f"Authorization: Bearer {token}\r\n")) == 403
    assert await count(db, "IpViolationDetected") == 1
    assert await count(db, "TokenRevoked") == 1


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/x/../invoices",
        "/api/v1/./invoices/7",
        "/api/v1//invoices",
        "/api/v1/%2e%2e/invoices",
        "/api/v1/debtors%2F..%2Finvoices",
        "/api/v1/debtors%2finvoices",
        "/api/v1/debtors%5Cinvoices",
        "/api/v1/debtors\\invoices",
    ],
)
async def test_paths_with_dot_or_empty_segments_are_refused_not_normalised(client, company, path):
    from tests.e2e.test_no_server_errors import raw_request

    app = await new_app(client, company, ip_allowlist=["127.0.0.1"], permissions=["debtors:read"])
    token = (await cc_token(client, app))["access_token"]
    request = (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    assert await raw_request(client, request) == 400
