"""The admin API for applications, over HTTP against a real PostgreSQL: every rule of
SPEC.md §2, what lands in the log, and that nothing lands on refusal."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from tests.conftest import Company
from tests.e2e.oauth_helpers import new_app

CC = {
    "name": "Billing sync",
    "grant_type": "client_credentials",
    "ip_allowlist": ["192.0.2.10", "198.51.100.0/24"],
    "permissions": ["invoices:read"],
    "notification_emails": ["ops@acme.example"],
}
AC = {
    "name": "Acme web app",
    "grant_type": "authorization_code",
    "redirect_uri": "https://app.acme.example/callbacks/tollgate",
    "permissions": ["invoices:read", "debtors:read"],
}


async def events(db, type_: str | None = None) -> list:
    if type_ is None:
        return await db.pool.fetch("SELECT * FROM events ORDER BY position")
    return await db.pool.fetch("SELECT * FROM events WHERE type = $1 ORDER BY position", type_)


async def create(client, company: Company, body: dict) -> dict:
    response = await client.post("/admin/applications", json=body, headers=company.auth)
    assert response.status == 201, await response.text()
    return await response.json()


async def refused(
    client, company: Company, db, method: str, path: str, status: int = 400, **kw
) -> dict:
    """The request is refused with `status` in RFC format, and nothing is appended."""
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    response = await client.request(
        method, path, headers=company.auth | kw.pop("headers", {}), **kw
    )
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error", "error_description"}
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before
    return body


# --- creation ----------------------------------------------------------------------------


async def test_create_returns_the_secret_once_and_stores_only_its_hash(client, company, db):
    body = await create(client, company, CC)
    assert len(body["client_id"]) == 43 and len(body["client_secret"]) == 43
    assert body["grant_type"] == "client_credentials"
    assert body["ip_allowlist"] == ["192.0.2.10", "198.51.100.0/24"]
    [created] = await events(db, "ApplicationCreated")
    assert created["stream_id"] == f"application-{body['client_id']}"
    assert created["company_id"] == company.company_id
    expected_hash = hashlib.sha256(body["client_secret"].encode()).hexdigest()
    assert f'"secret_hash":"{expected_hash}"' in created["payload"]
    dump = "".join(str(tuple(r)) for r in await events(db))
    assert body["client_secret"] not in dump
    # never shown again
    one = await (
        await client.get(f"/admin/applications/{body['client_id']}", headers=company.auth)
    ).json()
    listed = await (await client.get("/admin/applications", headers=company.auth)).json()
    assert "client_secret" not in one
    assert body["client_secret"] not in str(listed)
    assert one["name"] == "Billing sync"


async def test_create_records_who_when_and_from_where(client, company, db):
    response = await client.post(
        "/admin/applications", json=AC, headers=company.auth | {"X-Request-Id": "req-42"}
    )
    assert response.status == 201
    [created] = await events(db, "ApplicationCreated")
    meta = __import__("json").loads(created["metadata"])
    assert meta["actor"].startswith("admin_key:")
    assert meta["request_id"] == "req-42"
    assert meta["client_ip"] == "127.0.0.1"
    assert response.headers["X-Request-Id"] == "req-42"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (AC | {"redirect_uri": None}, "redirect_uri"),
        ({k: v for k, v in AC.items() if k != "redirect_uri"}, "redirect_uri"),
        (CC | {"ip_allowlist": []}, "ip_allowlist"),
        (AC | {"redirect_uri": "http://app.acme.example/cb"}, "redirect_uri"),
        (AC | {"redirect_uri": "https://app.acme.example/cb#frag"}, "redirect_uri"),
        (AC | {"redirect_uri": "/relative/cb"}, "redirect_uri"),
        (CC | {"ip_allowlist": ["300.1.1.1"]}, "ip_allowlist"),
        (CC | {"ip_allowlist": ["192.0.2.7/24"]}, "ip_allowlist"),
        (CC | {"ip_allowlist": ["example.com"]}, "ip_allowlist"),
        (CC | {"ip_allowlist": ["fe80::1%eth0"]}, "ip_allowlist"),
        (CC | {"ip_allowlist": ["fe80::1%\nBcc: x@evil.example"]}, "ip_allowlist"),
        (CC | {"ip_allowlist": ["fe80::%1/64"]}, "ip_allowlist"),
        (CC | {"permissions": []}, "permissions"),
        (CC | {"permissions": ["invoices:read", "nuclear:launch"]}, "permissions"),
        (CC | {"notification_emails": ["not-an-address"]}, "notification_emails"),
        # a local part only an SMTPUTF8 server takes (RFC 6531), and one that mail
        # programs would decode as an encoded word (RFC 2047)
        (CC | {"notification_emails": ["jösé@acme.example"]}, "notification_emails"),
        (CC | {"notification_emails": ["=?utf-8?q?x?=@acme.example"]}, "notification_emails"),
        (CC | {"name": ""}, "name"),
        (CC | {"name": "x" * 101}, "name"),
        (CC | {"grant_type": "password"}, "grant_type"),
        (CC | {"name": 42}, "name"),
        (CC | {"colour": "blue"}, "colour"),
    ],
)
async def test_bad_application_is_refused_naming_the_field(client, company, db, body, field):
    refusal = await refused(client, company, db, "POST", "/admin/applications", json=body)
    assert refusal["error"] == "invalid_request"
    assert field in refusal["error_description"]


async def test_loopback_http_redirects_are_allowed(client, company):
    for uri in ("http://localhost:8000/cb", "http://127.0.0.1/cb", "http://[::1]:3000/cb"):
        assert (await create(client, company, AC | {"redirect_uri": uri}))["redirect_uri"] == uri


async def test_addresses_are_validated_and_normalised(client, company):
    body = await create(
        client,
        company,
        CC
        | {
            "ip_allowlist": [
                "2001:DB8::1",
                "::ffff:192.0.2.9",
                "2001:db8:1::/48",
                "192.0.2.10",
                "192.0.2.10",
            ]
        },
    )
    assert body["ip_allowlist"] == ["2001:db8::1", "192.0.2.9", "2001:db8:1::/48", "192.0.2.10"]


async def test_a_notification_address_on_an_idn_domain_is_taken(client, company):
    """Its domain has an ASCII form (xn--) any mail server takes; it is kept as typed."""
    emails = ["ops@bücher.example", "ops@xn--bcher-kva.example", "ops+alerts@acme.example"]
    body = await create(client, company, CC | {"notification_emails": emails})
    assert body["notification_emails"] == ["ops@bücher.example", "ops+alerts@acme.example"]


@pytest.mark.parametrize(
    ("kwargs", "status", "error"),
    [
        (
            {"data": "{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_request",
        ),
        (
            {"data": "name=x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
            415,
            "unsupported_media_type",
        ),
        ({"data": "[]", "headers": {"Content-Type": "application/json"}}, 400, "invalid_request"),
        (
            {"data": "x" * 70_000, "headers": {"Content-Type": "application/json"}},
            413,
            "request_too_large",
        ),
    ],
)
async def test_malformed_bodies_get_a_clear_4xx(client, company, db, kwargs, status, error):
    refusal = await refused(
        client, company, db, "POST", "/admin/applications", status=status, **kwargs
    )
    assert refusal["error"] == error


# --- access ------------------------------------------------------------------------------


async def test_no_or_bad_credentials_get_401_with_a_bearer_challenge(client, company, db):
    for headers in (
        {},
        {"Authorization": "Bearer tgadm_" + "A" * 43},
        {"Authorization": "Basic eDp5"},
    ):
        response = await client.get("/admin/applications", headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["error"] == "invalid_token"


async def test_other_companies_applications_are_invisible_both_ways(
    client, company, other_company, db
):
    mine = await create(client, company, CC)
    theirs = await create(client, other_company, CC | {"name": "Globex sync"})
    for who, foreign in ((company, theirs), (other_company, mine)):
        path = f"/admin/applications/{foreign['client_id']}"
        assert (await client.get(path, headers=who.auth)).status == 404
        await refused(client, who, db, "PATCH", path, status=404, json={"name": "mine now"})
        await refused(client, who, db, "DELETE", path, status=404)
        await refused(client, who, db, "POST", path + "/rotate-secret", status=404)
        listed = await (await client.get("/admin/applications", headers=who.auth)).json()
        assert [a["client_id"] for a in listed["applications"]] != []
        assert foreign["client_id"] not in str(listed)
    unknown = await client.get("/admin/applications/nope", headers=company.auth)
    assert unknown.status == 404  # the same answer as for another company's
    for odd in ("%00", "a%00b", "%C3%A9", "x" * 65):  # never looked up: not a 503 either
        path = f"/admin/applications/{odd}"
        assert (await client.get(path, headers=company.auth)).status == 404
        await refused(client, company, db, "PATCH", path, status=404, json={"name": "x"})
        await refused(client, company, db, "DELETE", path, status=404)
        await refused(client, company, db, "POST", path + "/rotate-secret", status=404)


async def test_members_are_refused(client, company, db):
    created = await client.post(
        "/admin/users",
        json={"email": "clerk@acme.example", "role": "member", "password": "correct horse battery"},
        headers=company.auth,
    )
    assert created.status == 201
    login = await client.post(
        "/session", json={"email": "clerk@acme.example", "password": "correct horse battery"}
    )
    assert login.status == 200
    csrf = (await login.json())["csrf_token"]
    response = await client.get("/admin/applications")  # the session cookie
    assert response.status == 403
    assert (await response.json())["error"] == "forbidden"
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    response = await client.post("/admin/applications", json=CC, headers={"X-CSRF-Token": csrf})
    assert response.status == 403
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before


async def test_an_admin_session_works_and_needs_its_csrf_token_to_change(client, company, db):
    login = await client.post(
        "/session", json={"email": company.admin_email, "password": company.admin_password}
    )
    assert login.status == 200
    csrf = (await login.json())["csrf_token"]
    assert (await client.get("/admin/applications")).status == 200
    assert (await client.post("/admin/applications", json=CC)).status == 403
    response = await client.post("/admin/applications", json=CC, headers={"X-CSRF-Token": csrf})
    assert response.status == 201
    [created] = await events(db, "ApplicationCreated")
    assert __import__("json").loads(created["metadata"])["actor"].startswith("user:usr_")
    assert (await client.delete("/session")).status == 204
    assert (await client.get("/admin/applications")).status == 401


async def test_wrong_password_and_unknown_user_get_the_same_answer(client, company):
    wrong = await client.post("/session", json={"email": company.admin_email, "password": "x" * 12})
    unknown = await client.post(
        "/session", json={"email": "nobody@acme.example", "password": "x" * 12}
    )
    assert wrong.status == unknown.status == 401
    assert await wrong.json() == await unknown.json()


# --- changes -----------------------------------------------------------------------------


async def test_patch_records_before_and_after(client, company, db):
    app = await create(client, company, CC)
    path = f"/admin/applications/{app['client_id']}"
    response = await client.patch(
        path,
        json={
            "name": "Billing sync v2",
            "ip_allowlist": ["192.0.2.0/24"],
            "permissions": ["invoices:read", "payments:read"],
        },
        headers=company.auth,
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["name"] == "Billing sync v2"
    assert body["version"] == 4
    assert response.headers["ETag"] == '"4"'
    changes = {
        r["type"]: __import__("json").loads(r["payload"])
        for r in await events(db)
        if r["stream_id"] == f"application-{app['client_id']}"
    }
    assert changes["ApplicationRenamed"]["before"] == "Billing sync"
    assert changes["ApplicationRenamed"]["after"] == "Billing sync v2"
    assert changes["IpAllowlistChanged"]["before"] == ["192.0.2.10", "198.51.100.0/24"]
    assert changes["IpAllowlistChanged"]["after"] == ["192.0.2.0/24"]
    assert changes["PermissionsChanged"]["after"] == ["invoices:read", "payments:read"]


async def test_grant_type_cannot_change(client, company, db):
    app = await create(client, company, CC)
    refusal = await refused(
        client,
        company,
        db,
        "PATCH",
        f"/admin/applications/{app['client_id']}",
        json={"grant_type": "authorization_code", "redirect_uri": "https://x.example/cb"},
    )
    assert "grant_type" in refusal["error_description"]
    same = await client.patch(
        f"/admin/applications/{app['client_id']}",
        json={"grant_type": "client_credentials"},
        headers=company.auth,
    )
    assert same.status == 200  # naming the grant it already has changes nothing


async def test_patch_keeps_the_grant_rules(client, company, db):
    cc = await create(client, company, CC)
    ac = await create(client, company, AC)
    await refused(
        client,
        company,
        db,
        "PATCH",
        f"/admin/applications/{cc['client_id']}",
        json={"ip_allowlist": []},
    )
    await refused(
        client,
        company,
        db,
        "PATCH",
        f"/admin/applications/{ac['client_id']}",
        json={"redirect_uri": None},
    )
    await refused(
        client,
        company,
        db,
        "PATCH",
        f"/admin/applications/{ac['client_id']}",
        json={"permissions": ["x:y"]},
    )


async def test_patch_with_nothing_new_appends_nothing(client, company, db):
    app = await create(client, company, CC)
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    response = await client.patch(
        f"/admin/applications/{app['client_id']}",
        json={"name": "Billing sync"},
        headers=company.auth,
    )
    assert response.status == 200
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before


async def test_rotation_returns_a_new_secret_once(client, company, db):
    app = await create(client, company, CC)
    response = await client.post(
        f"/admin/applications/{app['client_id']}/rotate-secret", headers=company.auth
    )
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    rotated = await response.json()
    assert rotated["client_secret"] != app["client_secret"]
    assert rotated["secret_version"] == 2
    [event] = await events(db, "ClientSecretRotated")
    assert hashlib.sha256(rotated["client_secret"].encode()).hexdigest() in event["payload"]
    assert rotated["client_secret"] not in "".join(str(tuple(r)) for r in await events(db))


async def test_delete_removes_the_application(client, company, db):
    app = await create(client, company, CC)
    path = f"/admin/applications/{app['client_id']}"
    assert (await client.delete(path, headers=company.auth)).status == 204
    assert (await client.get(path, headers=company.auth)).status == 404
    assert (await client.delete(path, headers=company.auth)).status == 404
    assert len(await events(db, "ApplicationDeleted")) == 1
    listed = await (await client.get("/admin/applications", headers=company.auth)).json()
    assert listed == {"applications": []}


# --- concurrency -------------------------------------------------------------------------


async def test_concurrent_patches_lose_no_update(client, company, db):
    app = await create(client, company, CC)
    path = f"/admin/applications/{app['client_id']}"
    emails = [f"n{i}@acme.example" for i in range(6)]
    # Each writer changes a different field or value; all of them must be in the result.
    patches = [
        {"name": "Renamed"},
        {"ip_allowlist": ["192.0.2.99"]},
        {"permissions": ["reports:read"]},
        {"notification_emails": emails},
    ]
    responses = await asyncio.gather(
        *(client.patch(path, json=p, headers=company.auth) for p in patches)
    )
    assert [r.status for r in responses] == [200] * 4
    final = await (await client.get(path, headers=company.auth)).json()
    assert final["name"] == "Renamed"
    assert final["ip_allowlist"] == ["192.0.2.99"]
    assert final["permissions"] == ["reports:read"]
    assert final["notification_emails"] == emails
    versions = [
        r["version"]
        for r in await events(db)
        if r["stream_id"] == f"application-{app['client_id']}"
    ]
    assert versions == list(range(1, 6))


async def test_if_match_refuses_a_stale_version(client, company, db):
    app = await create(client, company, CC)
    path = f"/admin/applications/{app['client_id']}"
    a, b = await asyncio.gather(
        client.patch(path, json={"name": "A"}, headers=company.auth | {"If-Match": '"1"'}),
        client.patch(path, json={"name": "B"}, headers=company.auth | {"If-Match": '"1"'}),
    )
    assert sorted([a.status, b.status]) == [200, 412]
    assert len(await events(db, "ApplicationRenamed")) == 1


@pytest.mark.parametrize(
    ("if_match", "status"),
    [
        ('W/"1"', 412),  # a weak tag matches nothing: If-Match compares strongly
        ('W/"1", W/"2"', 412),
        ('"7", "1"', 200),  # any of the listed versions
        ('"7", W/"1"', 412),
        ("*", 200),  # any version
        ('"1', 400),
        ("1", 400),
        ('"one"', 400),
    ],
)
async def test_if_match_is_compared_strongly_over_its_list(client, company, db, if_match, status):
    """RFC 9110 §13.1.1: If-Match holds "*" or a list of entity tags, compared strongly."""
    app = await create(client, company, CC)
    path = f"/admin/applications/{app['client_id']}"
    answer = await client.patch(
        path, json={"name": "A"}, headers=company.auth | {"If-Match": if_match}
    )
    assert answer.status == status, await answer.text()
    assert len(await events(db, "ApplicationRenamed")) == (status == 200)


async def test_repeated_failed_sign_ins_are_throttled(client, company):
    for _ in range(5):
        response = await client.post(
            "/session", json={"email": company.admin_email, "password": "wrong guess 123"}
        )
        assert response.status == 401
    blocked = await client.post(
        "/session", json={"email": company.admin_email, "password": company.admin_password}
    )
    assert blocked.status == 429
    assert (await blocked.json())["error"] == "too_many_attempts"
    assert int(blocked.headers["Retry-After"]) > 0
    # another address is not held back by these failures
    other = await client.post(
        "/session", json={"email": "nobody@acme.example", "password": "x" * 12}
    )
    assert other.status == 401


async def test_concurrent_failed_sign_ins_meet_the_same_limit(client, company):
    """A burst must not get more guesses than a sequence: the limit (5 per address and
    caller) holds while the password checks of the burst are still running."""
    guesses = await asyncio.gather(
        *(
            client.post("/session", json={"email": company.admin_email, "password": f"guess {n}"})
            for n in range(30)
        )
    )
    statuses = sorted(r.status for r in guesses)
    assert statuses.count(401) <= 5
    assert statuses.count(429) >= 25


async def test_a_successful_sign_in_does_not_count_as_a_failure(client, company):
    for _ in range(8):  # more than the limit: each success takes its count back
        ok = await client.post(
            "/session", json={"email": company.admin_email, "password": company.admin_password}
        )
        assert ok.status == 200


async def test_a_committed_change_is_reported_even_if_reading_it_back_fails(
    client, company, db, monkeypatch
):
    """The database went away between the commit and this process reading the log back:
    the application exists, so the caller must get its one-time secret, not a 503."""
    from service.app import CONTEXT
    from service.commands import applications
    from service.eventlog import EventLogUnavailable

    feed = client.app[CONTEXT].feed

    async def unreachable(position: int) -> None:
        raise EventLogUnavailable("connection lost")

    monkeypatch.setattr(feed, "wait_for", unreachable)
    load = applications.load
    calls = 0

    async def read_back_fails(*args):  # the database is gone for the read after the commit
        nonlocal calls
        calls += 1
        raise EventLogUnavailable("connection lost")

    monkeypatch.setattr(applications, "load", read_back_fails)
    response = await client.post("/admin/applications", json=CC, headers=company.auth)
    monkeypatch.setattr(applications, "load", load)
    assert calls == 1
    assert response.status == 201, await response.text()
    assert (await response.json())["client_secret"]
    assert len(await events(db, "ApplicationCreated")) == 1


@pytest.mark.parametrize(
    ("method", "action"), [("DELETE", ""), ("POST", "/rotate-secret"), ("POST", "/revoke-tokens")]
)
async def test_if_match_holds_every_change_of_an_application(client, company, db, method, action):
    """RFC 9110 §13.1.1: with a stale If-Match the method is not performed. The README and
    the OpenAPI document promised it; only PATCH kept it: a stale tag deleted the
    application, rotated its secret, revoked its tokens."""
    app = await new_app(client, company)
    path = f"/admin/applications/{app['client_id']}"
    current = (await client.get(path, headers=company.auth)).headers["ETag"]
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    stale = await client.request(
        method, path + action, headers=company.auth | {"If-Match": '"999"'}
    )
    assert stale.status == 412, await stale.text()
    assert (await stale.json())["error"] == "precondition_failed"
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before
    done = await client.request(method, path + action, headers=company.auth | {"If-Match": current})
    assert done.status in (200, 204), await done.text()


@pytest.mark.parametrize(
    "tag", ['"' + "9" * 4301 + '"', '"\u00b3"', '"\u0661"', '"1"x', '"-1"', "W/3"]
)
async def test_if_match_takes_ascii_version_tags_only(client, company, db, tag):
    """A superscript or another script's digit is no version: "³" and 4,301 digits were a
    500 (int() refused them), and ARABIC-INDIC ONE was read as "1"."""
    app = await new_app(client, company)
    response = await client.patch(
        f"/admin/applications/{app['client_id']}",
        json={"name": "q"},
        headers=company.auth | {"If-Match": tag},
    )
    assert response.status == 400, await response.text()
    assert (await response.json())["error"] == "invalid_request"
    assert (await client.get(f"/admin/applications/{app['client_id']}", headers=company.auth)
            ).headers["ETag"] == '"1"'  # fmt: skip


@pytest.mark.parametrize(
    "name",
    ["\u3164", "\u2800\u2800", "\u115f", " \u3164 ", "a" + "\u0301" * 99, "\u0301\u0301"],
)
async def test_a_name_that_shows_nothing_is_refused(client, company, name):
    """The consent page names the application to the user: a Hangul filler, blank Braille,
    or a character under 99 accents showed as nothing, or a smear."""
    app = await new_app(client, company)
    response = await client.patch(
        f"/admin/applications/{app['client_id']}", json={"name": name}, headers=company.auth
    )
    assert response.status == 400, await response.text()
    assert (await response.json())["error_description"].startswith("name: must")
