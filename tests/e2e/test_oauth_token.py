"""POST /oauth/token over HTTP on a real PostgreSQL: client authentication, the
client_credentials grant, errors in RFC 6749 §5.2 form, secret rotation, allow lists."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess

import msgspec
import pytest

from service.oauth import tokens
from tests.e2e.oauth_helpers import basic, cc_token, new_app


async def test_client_credentials_with_basic_auth(client, company, db):
    app = await new_app(client, company)
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"
    body = await response.json()
    assert set(body) == {"access_token", "token_type", "scope"}  # no expiry, no refresh token
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "debtors:read invoices:read"  # all of the app's, sorted
    assert tokens.well_formed(body["access_token"], tokens.ACCESS)
    [issued] = await db.pool.fetch("SELECT * FROM events WHERE type = 'AccessTokenIssued'")
    payload = json.loads(issued["payload"])
    assert payload["token_hash"] == hashlib.sha256(body["access_token"].encode()).hexdigest()
    assert payload["expires_at"] is None
    assert payload["company_id"] == company.company_id
    assert json.loads(issued["metadata"])["actor"] == f"client:{app['client_id']}"
    assert body["access_token"] not in str(
        [tuple(r) for r in await db.pool.fetch("SELECT * FROM events")]
    )


async def test_credentials_in_the_body_and_json_bodies_work(client, company):
    app = await new_app(client, company)
    form = await client.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": app["client_id"],
            "client_secret": app["client_secret"],
        },
    )
    assert form.status == 200
    # the seed's JSON example: Basic header, JSON body
    as_json = await client.post(
        "/oauth/token",
        json={"grant_type": "client_credentials"},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert as_json.status == 200
    assert (await as_json.json())["token_type"] == "Bearer"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_the_seeds_curl_form_request(client, company):
    app = await new_app(client, company)
    header = basic(app["client_id"], app["client_secret"])["Authorization"]
    url = str(client.make_url("/oauth/token"))
    done = await asyncio.to_thread(
        subprocess.run,
        [
            "curl",
            "--silent",
            "--show-error",
            "--header",
            f"Authorization: {header}",
            "--form",
            "grant_type=client_credentials",
            "--request",
            "POST",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["token_type"] == "Bearer"
    assert tokens.well_formed(body["access_token"], tokens.ACCESS)


async def test_a_narrower_scope_can_be_asked_and_a_wider_one_is_refused(client, company):
    app = await new_app(client, company)
    assert (await cc_token(client, app, scope="debtors:read"))["scope"] == "debtors:read"
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "scope": "payments:write"},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_scope"


@pytest.mark.parametrize(
    ("mangle", "status", "error"),
    [
        (lambda a: basic(a["client_id"], "wrong"), 401, "invalid_client"),
        (lambda a: basic("nobody", a["client_secret"]), 401, "invalid_client"),
        (lambda a: {"Authorization": "Basic !!!notbase64"}, 401, "invalid_client"),
        (lambda a: {"Authorization": "Bearer abc"}, 401, "invalid_client"),
        (lambda a: {}, 401, "invalid_client"),
    ],
)
async def test_bad_client_authentication_is_invalid_client(
    client, company, db, mangle, status, error
):
    app = await new_app(client, company)
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    response = await client.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, headers=mangle(app)
    )
    assert response.status == status
    body = await response.json()
    assert body["error"] == error
    assert set(body) == {"error", "error_description"}
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert response.headers["Cache-Control"] == "no-store"
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before


@pytest.mark.parametrize(
    ("path", "data"),
    [
        ("/oauth/token", {"grant_type": "client_credentials"}),
        ("/oauth/revoke", {"token": "x"}),
        ("/oauth/introspect", {"token": "x"}),
    ],
)
async def test_invalid_client_is_challenged_only_in_the_scheme_the_client_used(
    client, company, path, data
):
    """RFC 6749 §5.2: 401 and the Basic challenge answer a client that used the
    Authorization header (or sent nothing); one that authenticated in the body gets 400 and
    the error alone (a 401 must carry a challenge, RFC 9110 §15.5.2), or a strict client
    (oauth4webapi) reports the challenge and never reads the error."""
    app = await new_app(client, company)
    in_body = [
        {"client_id": app["client_id"], "client_secret": "wrong"},
        {"client_id": "nobody", "client_secret": app["client_secret"]},
        {"client_id": "nobody"},  # a public client that does not exist
    ]
    for credentials in in_body:
        response = await client.post(path, data=data | credentials)
        assert response.status == 400, (credentials, await response.text())
        assert (await response.json())["error"] == "invalid_client"
        assert "WWW-Authenticate" not in response.headers, credentials
    for headers in (basic(app["client_id"], "wrong"), {}):
        response = await client.post(path, data=data, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Basic realm="tollgate"'


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({}, "invalid_request"),
        ({"grant_type": "password"}, "unsupported_grant_type"),
        (
            {"grant_type": "authorization_code", "code": "x", "redirect_uri": "https://x"},
            "unauthorized_client",
        ),
        ({"grant_type": "refresh_token", "refresh_token": "x"}, "unauthorized_client"),
    ],
)
async def test_request_errors_follow_rfc_6749(client, company, data, error):
    app = await new_app(client, company)
    response = await client.post(
        "/oauth/token", data=data, headers=basic(app["client_id"], app["client_secret"])
    )
    assert response.status == 400
    assert (await response.json())["error"] == error


async def test_two_authentication_methods_or_repeated_parameters_are_refused(client, company):
    app = await new_app(client, company)
    both = await client.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": app["client_id"],
            "client_secret": app["client_secret"],
        },
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert (await both.json())["error"] == "invalid_request"
    twice = await client.post(
        "/oauth/token",
        data="grant_type=client_credentials&grant_type=client_credentials",
        headers=basic(app["client_id"], app["client_secret"])
        | {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert twice.status == 400
    assert (await twice.json())["error"] == "invalid_request"


async def test_an_empty_parameter_counts_as_omitted(client, company):
    """RFC 6749 §3.1: "Parameters sent without a value MUST be treated as if they were
    omitted from the request." An empty client_secret beside Basic is not a second method."""
    app = await new_app(client, company)
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "client_secret": ""},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert response.status == 200, await response.text()


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        ("{", "application/json"),
        ('{"grant_type": 5}', "application/json"),
        ("<x/>", "text/xml"),
        ("", ""),
    ],
)
async def test_malformed_token_requests_get_invalid_request(client, company, body, ctype):
    app = await new_app(client, company)
    headers = basic(app["client_id"], app["client_secret"]) | (
        {"Content-Type": ctype} if ctype else {}
    )
    response = await client.post("/oauth/token", data=body.encode(), headers=headers)
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"


async def test_token_request_from_outside_the_allow_list_is_403_and_recorded(client, company, db):
    app = await new_app(client, company, ip_allowlist=["192.0.2.0/24"])
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert response.status == 403
    assert (await response.json())["error"] == "ip_not_allowed"
    [violation] = await db.pool.fetch("SELECT * FROM events WHERE type = 'IpViolationDetected'")
    payload = json.loads(violation["payload"])
    assert payload["ip"] == "127.0.0.1"
    assert payload["endpoint"] == "token"
    assert payload["client_id"] == app["client_id"]
    assert (
        await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'AccessTokenIssued'") == 0
    )
    # a wrong secret from that address is just invalid_client: no violation for strangers
    wrong = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=basic(app["client_id"], "nope"),
    )
    assert wrong.status == 401
    assert (
        await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'IpViolationDetected'")
        == 1
    )


async def test_a_revocation_authenticated_before_a_rotation_was_seen_is_refused(
    client, company, db, monkeypatch
):
    """Another process rotated the secret; this one authenticated the old secret before its
    model had the rotation (the race a paused or lagging process loses). The revocation's
    append holds the application's version, so it fails, and the client, authenticated
    again on the model caught up, is refused: nothing revoked with an old secret."""
    from service.web import oauth as web_oauth

    app = await new_app(client, company)
    token = (await cc_token(client, app))["access_token"]
    real = web_oauth.authenticate
    stale: list = []

    async def before_the_rotation(lookups, ledger, client_, meta, check):
        if not stale:  # the state this process had: the old secret, the old version
            # (a copy: the model updates its application in place)
            stale.append(msgspec.structs.replace(await real(lookups, ledger, client_, meta, check)))
            rotated = await client.post(
                f"/admin/applications/{app['client_id']}/rotate-secret", headers=company.auth
            )
            assert rotated.status == 200
            return stale[0]
        return await real(lookups, ledger, client_, meta, check)

    monkeypatch.setattr(web_oauth, "authenticate", before_the_rotation)
    revoked = await client.post(
        "/oauth/revoke",
        data={"token": token},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert revoked.status == 401, await revoked.text()
    assert (await revoked.json())["error"] == "invalid_client"
    assert await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'TokenRevoked'") == 0


async def test_rotated_secret_refuses_old_secret_and_keeps_old_tokens(client, company, db):
    app = await new_app(client, company)
    before = await cc_token(client, app)
    rotated = await (
        await client.post(
            f"/admin/applications/{app['client_id']}/rotate-secret", headers=company.auth
        )
    ).json()
    old = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=basic(app["client_id"], app["client_secret"]),
    )
    assert old.status == 401
    assert (await old.json())["error"] == "invalid_client"
    [used] = await db.pool.fetch("SELECT * FROM events WHERE type = 'OldClientSecretUsed'")
    assert json.loads(used["payload"])["ip"] == "127.0.0.1"
    assert app["client_secret"] not in used["payload"]
    new = await cc_token(client, app | {"client_secret": rotated["client_secret"]})
    assert new["access_token"] != before["access_token"]
    introspect = await client.post(
        "/oauth/introspect",
        data={"token": before["access_token"]},
        headers=basic(app["client_id"], rotated["client_secret"]),
    )
    assert (await introspect.json())["active"] is True  # tokens issued before stay valid


async def test_no_process_accepts_the_old_secret_once_a_rotation_committed(
    client, company, db, settings
):
    """Token requests with the old secret race a rotation, through a second service
    process on the same database; none may be issued after the rotation committed."""
    from aiohttp.test_utils import TestClient, TestServer

    from service.app import create_app
    from service.storage.database import Database

    app = await new_app(client, company)
    other = TestClient(
        TestServer(create_app(settings, database=Database(db.dsn, db.pool)), host="127.0.0.1")
    )
    await other.start_server()
    try:
        await cc_token(other, app)  # the other process knows the application
        outcomes: list[tuple[int, float]] = []
        stop = asyncio.Event()

        async def hammer() -> None:
            while not stop.is_set():
                sent = asyncio.get_running_loop().time()
                response = await other.post(
                    "/oauth/token",
                    data={"grant_type": "client_credentials"},
                    headers=basic(app["client_id"], app["client_secret"]),
                )
                outcomes.append((response.status, sent))
                await response.read()

        workers = [asyncio.create_task(hammer()) for _ in range(8)]
        await asyncio.sleep(0.3)
        rotation = await client.post(
            f"/admin/applications/{app['client_id']}/rotate-secret", headers=company.auth
        )
        committed = asyncio.get_running_loop().time()
        assert rotation.status == 200
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
    finally:
        await other.close()
    assert any(status == 200 for status, _ in outcomes)  # the race was real
    assert all(status == 401 for status, sent in outcomes if sent > committed)
    rotated_at = await db.pool.fetchval(
        "SELECT position FROM events WHERE type = 'ClientSecretRotated'"
    )
    issued = await db.pool.fetch("SELECT position FROM events WHERE type = 'AccessTokenIssued'")
    assert all(row["position"] < rotated_at for row in issued)
