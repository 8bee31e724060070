"""DPoP server nonces (RFC 9449 §8, §9) with DPOP_NONCE=required, over HTTP on a real
PostgreSQL: the token endpoint's use_dpop_nonce, the gateway's and /policy/check's
challenge, a nonce handed out by one `tollgate serve` process accepted by another, expiry,
and no nonce in clear in the table, the log or a log line."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid

import aiohttp
import pytest
import structlog
from joserfc import jws

from service.settings import Settings
from tests.e2e.hosts import admin_key, new_application, serving
from tests.e2e.oauth_helpers import basic, new_app
from tests.e2e.test_dpop import KEY, accepted, cc_request, proof, rs_headers, whoami
from tests.e2e.test_gateway import from_address, start

LIFETIME = 300


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        log_format="json",
        run_projections=True,
        dpop_nonce="required",
        dpop_nonce_lifetime=LIFETIME,
    )


async def issued_count(db) -> int:
    return await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'AccessTokenIssued'")


async def asked_for_nonce(response, status: int = 400) -> str:
    """The answer that asks for a nonce: the error and the nonce to use."""
    assert response.status == status, await response.text()
    body = await response.json()
    assert body["error"] == "use_dpop_nonce"
    nonce = response.headers["DPoP-Nonce"]
    assert len(nonce) == 32
    return nonce


async def bound_token(client, app) -> tuple[str, str]:
    """A DPoP-bound token, fetched as a client library does: asked for a nonce, then sent
    it. The token and the nonce the last answer named."""
    nonce = await asked_for_nonce(await cc_request(client, app, proof(client)))
    response = await cc_request(client, app, proof(client, nonce=nonce))
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["token_type"] == "DPoP"
    return body["access_token"], response.headers["DPoP-Nonce"]


# --- the token endpoint (RFC 9449 §8) --------------------------------------------------


async def test_the_token_endpoint_asks_for_a_nonce_then_binds_the_token(client, company, db):
    app = await new_app(client, company)
    first = proof(client)
    refused = await cc_request(client, app, first)
    nonce = await asked_for_nonce(refused)
    assert refused.headers["Cache-Control"] == "no-store"
    assert "nonce" in (await refused.json())["error_description"]
    # refused for its nonce, the proof was not spent, and nothing was issued
    assert await accepted(db) == 0
    assert await issued_count(db) == 0
    jti = json.loads(jws.extract_compact(first.encode()).payload)["jti"]
    response = await cc_request(client, app, proof(client, nonce=nonce, jti=jti))
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["token_type"] == "DPoP"
    assert response.headers["DPoP-Nonce"] == nonce  # the current one, for the next request
    assert response.headers["Cache-Control"] == "no-store"
    [payload] = await db.pool.fetch("SELECT payload FROM events WHERE type = 'AccessTokenIssued'")
    assert json.loads(payload["payload"])["dpop_jkt"] == KEY.thumbprint()
    assert await accepted(db) == 1
    # the nonce is good for its lifetime, in any number of proofs; each proof once
    again = proof(client, nonce=nonce)
    assert (await cc_request(client, app, again)).status == 200
    replay = await cc_request(client, app, again)
    assert replay.status == 400
    assert (await replay.json())["error"] == "invalid_dpop_proof"
    assert replay.headers["DPoP-Nonce"] == nonce  # every answer to a DPoP request names it
    # a request without a DPoP header gets a Bearer token and no nonce
    plain = await cc_request(client, app)
    assert plain.status == 200
    assert "DPoP-Nonce" not in plain.headers


@pytest.mark.parametrize(
    "made_up",
    [
        pytest.param("A" * 32, id="well-formed"),
        pytest.param("not a nonce of ours", id="malformed"),
        pytest.param(12345, id="not-a-string"),
    ],
)
async def test_a_made_up_nonce_is_asked_again(client, company, db, made_up):
    app = await new_app(client, company)
    nonce = await asked_for_nonce(await cc_request(client, app, proof(client, nonce=made_up)))
    assert nonce != made_up
    assert await accepted(db) == 0
    assert (await cc_request(client, app, proof(client, nonce=nonce))).status == 200


async def test_an_expired_nonce_is_asked_again_with_a_fresh_one(db, settings, company):
    client = await start(db, settings, dpop_nonce_lifetime=2)
    try:
        app = await new_app(client, company)
        old = await asked_for_nonce(await cc_request(client, app, proof(client)))
        await asyncio.sleep(2.2)
        fresh = await asked_for_nonce(await cc_request(client, app, proof(client, nonce=old)))
        assert fresh != old
        assert (
            "expired"
            in (await (await cc_request(client, app, proof(client, nonce=old))).json())[
                "error_description"
            ]
        )
        response = await cc_request(client, app, proof(client, nonce=fresh))
        assert response.status == 200, await response.text()
    finally:
        await client.close()


async def test_a_bad_proof_or_client_still_gets_its_own_error_and_the_nonce(client, company):
    app = await new_app(client, company)
    nonce = await asked_for_nonce(await cc_request(client, app, proof(client)))
    bad = await cc_request(client, app, proof(client, htm="GET", nonce=nonce))
    assert bad.status == 400
    assert (await bad.json())["error"] == "invalid_dpop_proof"
    assert bad.headers["DPoP-Nonce"] == nonce
    wrong = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=basic(app["client_id"], "wrong secret") | {"DPoP": proof(client, nonce=nonce)},
    )
    assert wrong.status == 401
    assert (await wrong.json())["error"] == "invalid_client"
    assert wrong.headers["DPoP-Nonce"] == nonce


async def test_a_client_held_to_dpop_that_sent_no_proof_is_told_the_nonce(client, company):
    """Its first proof needs a nonce: told it with the refusal, its next request is the
    one that succeeds, not one more round for the nonce."""
    app = await new_app(client, company, dpop_bound_access_tokens=True)
    refused = await cc_request(client, app)
    assert refused.status == 400
    assert (await refused.json())["error"] == "invalid_dpop_proof"
    nonce = refused.headers["DPoP-Nonce"]
    issued = await cc_request(client, app, proof(client, nonce=nonce))
    assert issued.status == 200, await issued.text()
    assert (await issued.json())["token_type"] == "DPoP"
    plain = await cc_request(client, await new_app(client, company, name="No DPoP"))
    assert plain.status == 200 and "DPoP-Nonce" not in plain.headers


async def test_a_client_outside_its_allow_list_is_a_violation_not_a_nonce_round(
    client, company, db
):
    app = await new_app(client, company)  # allows 127.0.0.1 only
    headers = basic(app["client_id"], app["client_secret"]) | {"DPoP": proof(client)}
    async with (
        from_address(client, "127.0.0.2") as outside,
        outside.post(
            "/oauth/token", data={"grant_type": "client_credentials"}, headers=headers
        ) as response,
    ):
        assert response.status == 403
        assert (await response.json())["error"] == "ip_not_allowed"
    violations = "SELECT count(*) FROM events WHERE type = 'IpViolationDetected'"
    assert await db.pool.fetchval(violations) == 1


# --- resources (RFC 9449 §9) -----------------------------------------------------------

AT_WHOAMI = {"htm": "GET", "path": "/api/v1/whoami"}


async def test_the_gateway_challenges_for_a_nonce_then_allows(client, company, db):
    app = await new_app(client, company)
    token, nonce = await bound_token(client, app)
    before = await accepted(db)
    refused = await whoami(client, token, proof(client, token=token, **AT_WHOAMI))
    assert refused.status == 401
    challenge = refused.headers["WWW-Authenticate"]
    assert challenge.startswith("DPoP ")
    assert 'error="use_dpop_nonce"' in challenge
    assert 'error_description="' in challenge
    assert refused.headers["DPoP-Nonce"] == nonce
    assert (await refused.json())["error"] == "use_dpop_nonce"
    assert await accepted(db) == before
    made_up = await whoami(client, token, proof(client, token=token, nonce="B" * 32, **AT_WHOAMI))
    assert made_up.status == 401
    assert 'error="use_dpop_nonce"' in made_up.headers["WWW-Authenticate"]
    allowed = await whoami(client, token, proof(client, token=token, nonce=nonce, **AT_WHOAMI))
    assert allowed.status == 200, await allowed.text()
    assert allowed.headers["DPoP-Nonce"] == nonce
    assert await accepted(db) == before + 1
    # a challenge is the normal first round trip: nothing revoked, no violation
    revoked = await db.pool.fetchval("SELECT count(*) FROM events WHERE type = 'TokenRevoked'")
    violations = "SELECT count(*) FROM events WHERE type = 'IpViolationDetected'"
    assert revoked == 0
    assert await db.pool.fetchval(violations) == 0
    # a Bearer token is not a DPoP request: no nonce asked for or handed out
    bearer = (await (await cc_request(client, app)).json())["access_token"]
    plain = await whoami(client, bearer, scheme="Bearer")
    assert plain.status == 200
    assert "DPoP-Nonce" not in plain.headers


async def test_policy_check_relays_the_nonce(client, company, db):
    app = await new_app(client, company)
    token, nonce = await bound_token(client, app)
    rs = await rs_headers(client)
    url = "https://api.example/invoices/7"

    async def check(ip="127.0.0.1", **claims):
        value = proof(client, token=token, htu=url, htm="GET", **claims)
        body = {"token": token, "ip": ip, "dpop_proof": value, "htm": "GET", "htu": url}
        return await client.post("/policy/check", json=body, headers=rs)

    refused = await check()
    assert refused.status == 401
    body = await refused.json()
    assert body["error"] == "use_dpop_nonce"
    assert body["dpop_nonce"] == nonce == refused.headers["DPoP-Nonce"]
    assert 'error="use_dpop_nonce"' in refused.headers["WWW-Authenticate"]
    allowed = await check(nonce=body["dpop_nonce"])
    assert allowed.status == 200, await allowed.text()
    decision = await allowed.json()
    assert decision["allow"] is True
    assert decision["dpop_nonce"] == nonce
    # from a disallowed address, a proof without a nonce is a violation like any other
    outside = await check(ip="198.51.100.7")
    assert outside.status == 403
    assert (await outside.json())["error"] == "ip_not_allowed"
    [violation] = await db.pool.fetch(
        "SELECT payload FROM events WHERE type = 'IpViolationDetected'"
    )
    assert json.loads(violation["payload"])["token_revoked"] is True


# --- several processes on one database -------------------------------------------------

PUBLIC_URL = "http://tollgate.test"  # one issuer for both processes, as README asks


def host_proof(*, htm="POST", path="/oauth/token", **claims) -> str:
    body = {"jti": uuid.uuid4().hex, "htm": htm, "htu": f"{PUBLIC_URL}{path}"}
    body |= {"iat": int(time.time())} | claims
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": KEY.as_dict(private=False)}
    return jws.serialize_compact(header, json.dumps(body), KEY, algorithms=["ES256"])


async def test_a_nonce_from_one_process_is_accepted_by_another(db, tmp_path):
    key = await admin_key(db, tmp_path / "setup")
    env = {"DPOP_NONCE": "required", "PUBLIC_URL": PUBLIC_URL}
    async with (
        serving(db, tmp_path / "a", **env) as a,
        serving(db, tmp_path / "b", **env) as b,
        aiohttp.ClientSession() as http,
    ):
        app = await new_application(a.base, key)
        auth = basic(app["client_id"], app["client_secret"])

        async def token_request(base: str, value: str):
            async with http.post(
                f"{base}/oauth/token",
                data={"grant_type": "client_credentials"},
                headers=auth | {"DPoP": value},
            ) as response:
                return response.status, response.headers.get("DPoP-Nonce"), await response.json()

        status, from_a, body = await token_request(a.base, host_proof())
        assert (status, body["error"]) == (400, "use_dpop_nonce")
        status, from_b, body = await token_request(b.base, host_proof())
        assert (status, body["error"]) == (400, "use_dpop_nonce")
        assert from_a != from_b  # each process hands out its own
        # each process accepts the other's, which it had never seen
        status, _, body = await token_request(b.base, host_proof(nonce=from_a))
        assert status == 200, body
        token = body["access_token"]
        status, _, body = await token_request(a.base, host_proof(nonce=from_b))
        assert status == 200, body
        # and at the gateway of the other process
        value = host_proof(htm="GET", path="/api/v1/whoami", nonce=from_a, ath=_ath(token))
        async with http.get(
            f"{b.base}/api/v1/whoami", headers={"Authorization": f"DPoP {token}", "DPoP": value}
        ) as response:
            assert response.status == 200, await response.text()
            assert response.headers["DPoP-Nonce"] == from_b
    rows = await db.pool.fetch("SELECT digest FROM dpop_nonces")
    assert {bytes(r["digest"]) for r in rows} == {
        hashlib.sha256(n.encode()).digest() for n in (from_a, from_b)
    }


def _ath(token: str) -> str:
    from service.domain.dpop import access_token_hash

    return access_token_hash(token)


# --- nothing usable kept -----------------------------------------------------------------


async def test_no_nonce_in_clear_in_the_table_the_log_or_log_lines(client, company, db):
    app = await new_app(client, company)
    with structlog.testing.capture_logs() as lines:
        token, nonce = await bound_token(client, app)
        await whoami(client, token, proof(client, token=token, **AT_WHOAMI))
        await whoami(client, token, proof(client, token=token, nonce=nonce, **AT_WHOAMI))
    [row] = await db.pool.fetch("SELECT * FROM dpop_nonces")
    assert bytes(row["digest"]) == hashlib.sha256(nonce.encode()).digest()
    assert row["expires_at"].timestamp() == pytest.approx(time.time() + LIFETIME, abs=10)
    dumped = [json.dumps(lines, default=str)]
    for table in ("events", "dpop_nonces"):
        rows = await db.pool.fetch(f"SELECT * FROM {table}")
        dumped.append(str([tuple(r) for r in rows]))
        dumped.append(
            str(
                [
                    tuple(bytes(v).hex() if isinstance(v, bytes) else v for v in r.values())
                    for r in rows
                ]
            )
        )
    everything = "".join(dumped)
    assert nonce not in everything
    assert nonce.encode().hex() not in everything
