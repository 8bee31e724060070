"""GET /admin/events and `tollgate events`: a company's own history, page by page, with who,
when, from where, and before/after of every change."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from service.audit.history import Query, statement
from tests.conftest import Company, make_company
from tests.e2e.test_admin_applications import AC, CC, create


async def history(client, company: Company, **params) -> dict:
    response = await client.get("/admin/events", params=params, headers=company.auth)
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    return await response.json()


async def positions_of(db, company: Company) -> list[int]:
    rows = await db.pool.fetch(
        "SELECT position FROM events WHERE company_id = $1 ORDER BY position", company.company_id
    )
    return [r["position"] for r in rows]


async def busy_companies(client) -> tuple[Company, Company, dict, dict]:
    """Two companies whose writes interleave in the log."""
    acme, globex = await make_company(client, "Acme"), await make_company(client, "Globex")
    ours = await create(client, acme, CC)
    theirs = await create(client, globex, CC | {"name": "Globex sync"})
    for n in range(3):
        for company, app in ((acme, ours), (globex, theirs)):
            response = await client.patch(
                f"/admin/applications/{app['client_id']}",
                json={"name": f"{company.company_id} app {n}"},
                headers=company.auth,
            )
            assert response.status == 200
    return acme, globex, ours, theirs


async def test_the_history_is_the_callers_own_company_both_ways(client, db):
    acme, globex, ours, theirs = await busy_companies(client)
    for company, mine, other, stranger in (
        (acme, ours, theirs, globex),
        (globex, theirs, ours, acme),
    ):
        page = await history(client, company, limit=1000)
        got = [e["position"] for e in page["events"]]
        assert got == await positions_of(db, company)
        text = json.dumps(page)
        assert mine["client_id"] in text
        assert other["client_id"] not in text
        assert stranger.company_id not in text
        assert stranger.admin_email not in text
        # a filter naming the other company's stream finds nothing
        filtered = await history(client, company, stream=f"application-{other['client_id']}")
        assert filtered == {"events": [], "next_after": None}


async def test_cursor_pagination_returns_every_event_exactly_once(client, db):
    acme, _globex, _ours, _theirs = await busy_companies(client)
    expected = await positions_of(db, acme)
    assert len(expected) >= 7  # more than two pages of 3
    seen: list[int] = []
    after, pages = 0, 0
    while True:
        page = await history(client, acme, after=after, limit=3)
        pages += 1
        assert len(page["events"]) <= 3
        if not page["events"]:
            assert page["next_after"] is None
            break
        assert page["next_after"] == page["events"][-1]["position"]
        seen.extend(e["position"] for e in page["events"])
        after = page["next_after"]
    assert seen == expected  # in order, none missing, none twice
    assert pages == -(-len(expected) // 3) + 1  # the full pages, then one empty page
    # the defaults: from the start, 100 at most
    assert [e["position"] for e in (await history(client, acme))["events"]] == expected[:100]


async def test_type_and_stream_filters(client, company, db):
    app = await create(client, company, CC)
    other = await create(client, company, AC)
    for name in ("One", "Two"):
        await client.patch(
            f"/admin/applications/{app['client_id']}", json={"name": name}, headers=company.auth
        )
    renamed = await history(client, company, type="ApplicationRenamed")
    assert [e["type"] for e in renamed["events"]] == ["ApplicationRenamed"] * 2
    assert [e["payload"]["after"] for e in renamed["events"]] == ["One", "Two"]
    stream = f"application-{other['client_id']}"
    only = await history(client, company, stream=stream)
    assert [(e["stream"], e["type"]) for e in only["events"]] == [(stream, "ApplicationCreated")]
    both = await history(client, company, stream=stream, type="ApplicationRenamed")
    assert both["events"] == []
    created = await history(client, company, type="ApplicationCreated", limit=1)
    assert len(created["events"]) == 1
    nxt = await history(
        client, company, type="ApplicationCreated", after=created["next_after"], limit=1
    )
    assert nxt["events"][0]["payload"]["client_id"] == other["client_id"]


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("after=-1", "after"),
        ("after=abc", "after"),
        ("after=", "after"),
        ("after=1.5", "after"),
        ("after=%2B5", "after"),
        ("after=99999999999999999999", "after"),
        ("after=1&after=2", "after"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=", "limit"),
        ("type=Nope", "type"),
        ("type=applicationcreated", "type"),
        ("type=", "type"),
        ("stream=", "stream"),
        ("stream=" + "s" * 501, "stream"),
        ("stream=a%00b", "stream"),
        ("stream=a%0Ab", "stream"),
    ],
)
async def test_bad_parameters_are_refused_and_change_nothing(client, company, db, query, parameter):
    before = await db.pool.fetchval("SELECT count(*) FROM events")
    response = await client.get(f"/admin/events?{query}", headers=company.auth)
    assert response.status == 400
    body = await response.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == "invalid_request"
    assert body["error_description"].startswith(parameter)
    assert await db.pool.fetchval("SELECT count(*) FROM events") == before


async def test_members_and_strangers_are_refused(client, company, db):
    member = await (
        await client.post(
            "/admin/users",
            json={"email": "clerk@acme.example", "role": "member"},
            headers=company.auth,
        )
    ).json()
    assert (await client.get("/admin/events")).status == 401
    assert (
        await client.get("/admin/events", headers={"Authorization": "Bearer nonsense"})
    ).status == 401
    login = await client.post(
        "/session", json={"email": "clerk@acme.example", "password": member["password"]}
    )
    assert login.status == 200
    response = await client.get("/admin/events")  # the session cookie, a member's
    assert response.status == 403
    assert (await response.json())["error"] == "forbidden"


async def test_an_admin_session_reads_the_history_too(client, company):
    login = await client.post(
        "/session", json={"email": company.admin_email, "password": company.admin_password}
    )
    assert login.status == 200
    user_id = (await login.json())["user_id"]
    csrf = (await login.json())["csrf_token"]
    made = await client.post(
        "/admin/applications", json=CC, headers={"X-CSRF-Token": csrf, "X-Request-Id": "web-1"}
    )
    assert made.status == 201
    response = await client.get("/admin/events", params={"type": "ApplicationCreated"})
    assert response.status == 200
    [event] = (await response.json())["events"]
    assert event["actor"] == f"user:{user_id}"
    assert event["request_id"] == "web-1"


async def test_a_patch_shows_who_when_from_where_and_before_after(client, company):
    app = await create(client, company, CC)
    started = datetime.now(UTC)
    response = await client.patch(
        f"/admin/applications/{app['client_id']}",
        json={"ip_allowlist": ["203.0.113.7"], "permissions": ["invoices:read", "debtors:read"]},
        headers=company.auth | {"X-Request-Id": "change-42"},
    )
    assert response.status == 200
    events = (await history(client, company, stream=f"application-{app['client_id']}"))["events"]
    assert [e["type"] for e in events] == [
        "ApplicationCreated",
        "IpAllowlistChanged",
        "PermissionsChanged",
    ]
    created, allowlist, permissions = events
    [key] = (await (await client.get("/admin/keys", headers=company.auth)).json())["keys"]
    assert allowlist["actor"] == permissions["actor"] == f"admin_key:{key['key_id']}"
    assert allowlist["request_id"] == permissions["request_id"] == "change-42"
    assert allowlist["client_ip"] == "127.0.0.1"
    assert allowlist["causation"] is None
    assert allowlist["version"] == 2 and permissions["version"] == 3
    assert created["position"] < allowlist["position"] < permissions["position"]
    when = datetime.fromisoformat(allowlist["recorded_at"])
    assert when.utcoffset().total_seconds() == 0
    assert abs((when - started).total_seconds()) < 60
    assert allowlist["payload"] == {
        "company_id": company.company_id,
        "client_id": app["client_id"],
        "before": ["192.0.2.10", "198.51.100.0/24"],
        "after": ["203.0.113.7"],
    }
    assert permissions["payload"]["before"] == ["invoices:read"]
    assert permissions["payload"]["after"] == ["invoices:read", "debtors:read"]
    assert set(allowlist) == {
        "position", "stream", "version", "type", "recorded_at", "actor", "request_id",
        "client_ip", "causation", "payload",
    }  # fmt: skip


async def test_password_hashes_are_not_shown(client, company, db):
    await client.post(
        "/admin/users",
        json={"email": "b@acme.example", "role": "admin"},
        headers=company.auth,
    )
    page = await history(client, company, type="UserAdded")
    assert len(page["events"]) == 2
    assert {e["payload"]["password_hash"] for e in page["events"]} == {"[redacted]"}
    assert "$argon2" not in json.dumps(page)


# --- the command line ----------------------------------------------------------------


def tollgate(db, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": db.dsn, "LOG_FORMAT": "json"}
    return subprocess.run(
        [sys.executable, "-m", "service", "events", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def lines(done: subprocess.CompletedProcess[str]) -> list[dict]:
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


async def test_the_command_line_prints_the_same_events(client, db):
    acme, globex, ours, _theirs = await busy_companies(client)
    over_http = (await history(client, acme, limit=1000))["events"]
    printed = lines(await asyncio.to_thread(tollgate, db, "--company", acme.company_id))
    assert printed == over_http
    # the same paging and filters
    page = await history(client, acme, after=over_http[1]["position"], limit=2)
    printed = lines(
        await asyncio.to_thread(
            tollgate,
            db,
            "--company",
            acme.company_id,
            "--after",
            str(over_http[1]["position"]),
            "--limit",
            "2",
        )
    )
    assert printed == page["events"]
    stream = f"application-{ours['client_id']}"
    printed = lines(
        await asyncio.to_thread(
            tollgate,
            db,
            "--company",
            acme.company_id,
            "--type",
            "ApplicationRenamed",
            "--stream",
            stream,
        )
    )
    assert (
        printed == (await history(client, acme, type="ApplicationRenamed", stream=stream))["events"]
    )
    assert len(printed) == 3
    # without --company: the whole log, both companies and system-wide events
    everything = lines(await asyncio.to_thread(tollgate, db))
    assert [e["position"] for e in everything] == [
        r["position"] for r in await db.pool.fetch("SELECT position FROM events ORDER BY position")
    ]
    assert globex.company_id in json.dumps(everything)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--after", "-3"), "--after"),
        (("--after", "x"), "--after"),
        (("--limit", "0"), "--limit"),
        (("--limit", "5000"), "--limit"),
        (("--type", "Nope"), "--type"),
        (("--company", "co_nobody"), "--company"),
    ],
)
async def test_the_command_line_refuses_bad_input_with_one_line(client, company, db, args, words):
    done = await asyncio.to_thread(tollgate, db, *args)
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0
    assert words in done.stderr
    assert "Traceback" not in done.stderr


# --- the cost of a page ----------------------------------------------------------------


async def test_a_page_reads_the_company_index_not_the_whole_log(db):
    """Even with the generic plan that asyncpg's prepared statements end up with, a page of
    a small company in a long log reads that company's rows only."""
    await db.pool.execute(
        """
        INSERT INTO events (position, stream_id, version, type, company_id, payload, metadata,
                            recorded_at, hash)
        SELECT g, 's' || g, 1, 'AccessTokenIssued',
               CASE WHEN g % 5000 = 0 THEN 'co_small' ELSE 'co_big' || (g % 20) END,
               '{}', '{}', now(), '\\x00'
        FROM generate_series(1, 60000) AS g
        """
    )
    await db.pool.execute("ANALYZE events")
    cases = [
        Query("co_small", after=0, limit=100),
        Query("co_small", after=0, limit=100, type="AccessTokenIssued"),
        Query("co_big3", after=100, limit=50),
        Query("co_big3", after=0, limit=10, type="IpViolationDetected"),
    ]
    async with db.pool.acquire() as conn:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        for n, query in enumerate(cases):
            sql, args = statement(query)
            await conn.execute(f"PREPARE page{n} AS {sql}")
            literals = ", ".join(str(a) if isinstance(a, int) else f"'{a}'" for a in args)
            plan = "\n".join(
                r[0]
                for r in await conn.fetch(
                    f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) EXECUTE page{n}({literals})"
                )
            )
            assert "events_company_position" in plan, plan
            removed = [int(x) for x in re.findall(r"Rows Removed by Filter: (\d+)", plan)]
            assert sum(removed) <= 3000, plan  # at most the company's own rows (co_big3: 3000)


async def test_an_event_this_version_cannot_read_is_shown_not_a_500(client, company, db):
    """Written by a newer version during a rolling deploy (or altered): the history shows
    that it is there and unreadable, and nothing of its content."""
    await create(client, company, CC)
    position = await db.pool.fetchval("SELECT max(position) FROM events") + 1
    await db.pool.execute(
        "INSERT INTO events (position, stream_id, version, type, schema_version, company_id,"
        " payload, metadata, recorded_at, hash) VALUES ($1, 'future-1', 1, 'FromTheFuture', 1,"
        " $2, '{\"secret_hash\": \"abc\"}', '{}', now(), sha256('x'::bytea))",
        position,
        company.company_id,
    )
    page = await history(client, company)
    [unread] = [e for e in page["events"] if e["position"] == position]
    assert unread["type"] == "FromTheFuture"
    assert unread["payload"] == {"unreadable": "written by a newer version of Tollgate, or altered"}
    printed = lines(tollgate(db, "--company", company.company_id))
    assert [e["payload"] for e in printed if e["position"] == position] == [unread["payload"]]


async def test_another_companys_requests_show_no_address_or_request_id(client, company, db):
    """A connection's tokens are the connecting company's events, asked for by the
    publisher's servers, and refused at the gateway or /policy/check when sent from
    outside its allow list: the connecting company's admins saw the publisher's addresses
    and its own request ids. Their own requests still show."""
    from service.app import CONTEXT
    from service.commands.directory import register_resource_server
    from service.eventlog import Metadata
    from tests.e2e.oauth_helpers import basic, code_for, new_app
    from tests.e2e.test_gateway import bearer, from_address
    from tests.e2e.test_oauth_flows import exchange

    globex = await make_company(client, "Globex")
    app = await new_app(
        client, company, grant_type="authorization_code", ip_allowlist=["127.0.0.1"]
    )
    tokens = []
    for n in range(2):
        code = await code_for(client, globex, app)
        client.session.cookie_jar.clear()
        exchanged = await client.post(
            "/oauth/token",
            data={"grant_type": "authorization_code", "code": code,
                  "redirect_uri": app["redirect_uri"]},
            headers=basic(app["client_id"], app["client_secret"])
            | {"X-Request-Id": f"acme-backend-{n}"},
        )  # fmt: skip
        assert exchanged.status == 200, await exchanged.text()
        tokens.append((await exchanged.json())["access_token"])
    async with from_address(client, "127.0.0.2") as outsider:
        refused = await outsider.get(
            "/api/v1/whoami", headers=bearer(tokens[0]) | {"X-Request-Id": "acme-gateway-1"}
        )
        assert refused.status == 403
    _, key = await register_resource_server(client.app[CONTEXT], "billing api", Metadata())
    checked = await client.post(
        "/policy/check",
        json={"token": tokens[1], "ip": "203.0.113.1"},
        headers=bearer(key) | {"X-Request-Id": "acme-rs-2"},
    )
    assert checked.status == 403
    # the last code again: a reuse, recorded with the address it came from
    replayed = await exchange(client, app, code)
    assert replayed.status == 400
    events = (await history(client, globex))["events"]
    theirs = [e for e in events if e["type"] in ("AuthorizationCodeRedeemed", "TokenRevoked")]
    assert len(theirs) == 5  # two redeemed, two violations, the reuse's revocation
    assert all(e["client_ip"] is None and e["request_id"] is None for e in theirs), theirs
    [granted, *_] = [e for e in events if e["type"] == "ConnectionGranted"]
    assert granted["client_ip"] == "127.0.0.1"  # Globex's own admin's
    [reused] = [e for e in events if e["type"] == "AuthorizationCodeReused"]
    assert reused["payload"]["ip"] is None  # the publisher's backend's address
    violations = [
        e["payload"]["ip"] for e in theirs if e["payload"].get("reason") == "ip_violation"
    ]
    assert sorted(violations) == ["127.0.0.2", "203.0.113.1"]  # what a violation is about
    listed = json.dumps(events)
    assert "acme-" not in listed
    # The publisher sees its own requests, where they are its events (the violations).
    ours = json.dumps((await history(client, company))["events"])
    assert "acme-gateway-1" in ours and "acme-rs-2" in ours
