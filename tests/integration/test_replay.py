"""`tollgate audit replay`: the state at a position or a moment, from the log alone."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from datetime import UTC, datetime

import msgspec
import pytest

from projections.catalog import sql_projections
from projections.runner import ProjectionRunner
from service import events as ev
from service.audit.replay import ReplayedState, ReplayError, encode, parse_until, replay
from service.eventlog import EventLog
from tests.factories import PERMISSIONS, application, digest, populate, token

# --- helpers -----------------------------------------------------------------------------


async def app_event(eventlog: EventLog, client_id: str, event: ev.Event) -> int:
    stream = f"application-{client_id}"
    version = await eventlog.stream_version(stream)
    return (await eventlog.append(stream, version, [event]))[-1]


async def issue(eventlog: EventLog, tok: ev.AccessTokenIssued) -> int:
    return (await eventlog.append(f"token-{tok.family_id}", 0, [tok]))[-1]


def revoke(tok: ev.AccessTokenIssued) -> ev.TokenRevoked:
    return ev.TokenRevoked(
        company_id=tok.company_id,
        client_id=tok.client_id,
        family_id=tok.family_id,
        reason="client_request",
    )


def apps_by_id(state: ReplayedState) -> dict[str, object]:
    return {a.client_id: a for a in state.applications}


def tokens_by_family(state: ReplayedState) -> dict[str, object]:
    return {t.family_id: t for t in state.tokens}


async def tollgate(db, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "DATABASE_URL": db.dsn, "LOG_FORMAT": "json"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# --- replay against the live projections -------------------------------------------------


async def test_replay_at_the_head_equals_the_live_projections(eventlog: EventLog, db):
    await populate(eventlog, tokens=600)
    changes = [
        ev.ApplicationRenamed(
            company_id="co0", client_id="co0-app0", before="App 0", after="Billing sync"
        ),
        ev.ClientSecretRotated(
            company_id="co0", client_id="co0-app0", secret_hash=digest("s2"), secret_version=2
        ),
        ev.RedirectUriChanged(
            company_id="co0",
            client_id="co0-app1",
            before="https://example.com/cb",
            after="https://example.com/callback",
        ),
        ev.NotificationEmailsChanged(
            company_id="co1",
            client_id="co1-app0",
            before=["ops@example.com"],
            after=["sec@example.com", "ops@example.com"],
        ),
        ev.PermissionsChanged(
            company_id="co1", client_id="co1-app0", before=PERMISSIONS, after=PERMISSIONS[1:]
        ),
    ]
    for change in changes:
        await app_event(eventlog, change.client_id, change)
    head = await eventlog.head()
    runner = ProjectionRunner(eventlog, db.pool, db.dsn, sql_projections(), batch_size=250)
    for name in runner.projections:
        assert await runner.catch_up(name) == head

    state = await replay(db.pool, head)

    assert state.position == state.head == head
    assert state.at is not None
    sql_apps = [
        (r["client_id"], r["company_id"], r["name"], r["grant_type"], r["redirect_uri"],
         list(r["ip_allowlist"]), sorted(r["permissions"]), list(r["notification_emails"]),
         r["secret_version"], r["version"])
        for r in await db.pool.fetch("SELECT * FROM applications ORDER BY client_id")
    ]  # fmt: skip
    replayed_apps = [
        (a.client_id, a.company_id, a.name, a.grant_type, a.redirect_uri, a.ip_allowlist,
         a.permissions, a.notification_emails, a.secret_version, a.version)
        for a in state.applications
    ]  # fmt: skip
    assert replayed_apps == sql_apps
    assert len(sql_apps) == 11
    assert apps_by_id(state)["co0-app0"].secret_version == 2

    sql_tokens = sorted(
        (bytes(r["token_hash"]).hex()[:16], r["family_id"], r["client_id"], r["company_id"],
         sorted(r["permissions"]), r["expires_at"])
        for r in await db.pool.fetch("SELECT * FROM live_tokens")
        if r["expires_at"] is None or r["expires_at"] > state.at
    )  # fmt: skip
    replayed_tokens = sorted(
        (t.token_hash_prefix, t.family_id, t.client_id, t.company_id, t.permissions, t.expires_at)
        for t in state.tokens
    )
    assert replayed_tokens == sql_tokens
    assert len(sql_tokens) > 300
    # the permission removed from co1-app0 left its live tokens, in both
    assert all(
        PERMISSIONS[0] not in t.permissions for t in state.tokens if t.client_id == "co1-app0"
    )


async def test_replay_at_an_earlier_position_shows_the_state_then(eventlog: EventLog, db):
    acme = application("acme", 1)
    await app_event(eventlog, acme.client_id, acme)
    first, second = token(acme, 1), token(acme, 2)
    await issue(eventlog, first)
    await issue(eventlog, second)
    await eventlog.append(
        f"connection-partner-{acme.client_id}",
        0,
        [
            ev.ConnectionGranted(
                company_id="partner",
                client_id=acme.client_id,
                user_id="u1",
                permissions=PERMISSIONS[:3],
            )
        ],
    )
    partner_token = msgspec.structs.replace(
        token(acme, 3), company_id="partner", permissions=PERMISSIONS[:3]
    )
    mark = await issue(eventlog, partner_token)

    await app_event(
        eventlog,
        acme.client_id,
        ev.IpAllowlistChanged(
            company_id="acme",
            client_id=acme.client_id,
            before=["192.0.2.0/24"],
            after=["198.51.100.0/24", "2001:db8::/32"],
        ),
    )
    await eventlog.append(f"token-{first.family_id}", 1, [revoke(first)])
    await app_event(
        eventlog,
        acme.client_id,
        ev.PermissionsChanged(
            company_id="acme",
            client_id=acme.client_id,
            before=PERMISSIONS,
            after=[PERMISSIONS[0], PERMISSIONS[3]],
        ),
    )
    later = application("acme", 2)
    await app_event(eventlog, later.client_id, later)
    await eventlog.append(
        f"connection-partner-{acme.client_id}",
        1,
        [
            ev.ConnectionRevoked(
                company_id="partner", client_id=acme.client_id, reason="admin_request"
            )
        ],
    )

    then = await replay(db.pool, mark)
    now = await replay(db.pool, await eventlog.head())

    assert then.position == mark
    assert list(apps_by_id(then)) == [acme.client_id]  # created later: absent
    assert apps_by_id(then)[acme.client_id].ip_allowlist == ["192.0.2.0/24"]  # old value
    assert apps_by_id(then)[acme.client_id].permissions == sorted(PERMISSIONS)
    assert set(tokens_by_family(then)) == {
        first.family_id,
        second.family_id,
        partner_token.family_id,
    }  # revoked later: still live then
    assert tokens_by_family(then)[second.family_id].permissions == sorted(PERMISSIONS)
    assert [(c.company_id, c.client_id, c.user_id, c.permissions) for c in then.connections] == [
        ("partner", acme.client_id, "u1", sorted(PERMISSIONS[:3]))
    ]
    assert tokens_by_family(then)[first.family_id].token_hash_prefix == first.token_hash[:16]

    assert set(apps_by_id(now)) == {acme.client_id, later.client_id}
    assert apps_by_id(now)[acme.client_id].ip_allowlist == ["198.51.100.0/24", "2001:db8::/32"]
    assert set(tokens_by_family(now)) == {second.family_id}
    assert tokens_by_family(now)[second.family_id].permissions == sorted(
        [PERMISSIONS[0], PERMISSIONS[3]]
    )
    assert now.connections == []


async def test_replay_until_a_timestamp_stops_at_the_last_event_recorded_by_then(
    eventlog: EventLog, db
):
    before_anything = datetime.now(UTC)
    await asyncio.sleep(0.02)
    acme = application("acme", 1)
    await app_event(eventlog, acme.client_id, acme)
    position = await issue(eventlog, token(acme, 1))
    await asyncio.sleep(0.02)
    cut = datetime.now(UTC)
    await asyncio.sleep(0.02)
    await eventlog.append(f"token-{token(acme, 1).family_id}", 1, [revoke(token(acme, 1))])
    later = application("acme", 2)
    await app_event(eventlog, later.client_id, later)

    at_cut = await replay(db.pool, cut)
    at_position = await replay(db.pool, position)

    assert at_cut.position == position
    assert at_cut.at == cut
    assert msgspec.structs.replace(at_cut, at=None) == msgspec.structs.replace(at_position, at=None)
    assert len(at_cut.tokens) == 1
    empty = await replay(db.pool, before_anything)
    assert (empty.position, empty.applications, empty.tokens) == (0, [], [])
    # an ISO 8601 text names the same moment, with or without an explicit offset
    naive = cut.replace(tzinfo=None).isoformat()
    assert await replay(db.pool, parse_until(naive)) == at_cut
    assert await replay(db.pool, parse_until(cut.isoformat().replace("+00:00", "Z"))) == at_cut


async def test_token_expiry_is_judged_at_the_replay_moment_not_now(eventlog: EventLog, db):
    acme = application("acme", 1, "authorization_code")
    await app_event(eventlog, acme.client_id, acme)
    expires_at = math.ceil(time.time()) + 1
    short = msgspec.structs.replace(token(acme, 1), expires_at=expires_at)
    issued_at = await issue(eventlog, short)
    long_lived = msgspec.structs.replace(token(acme, 2), expires_at=expires_at + 3600)
    await issue(eventlog, long_lived)
    while time.time() <= expires_at + 0.05:
        await asyncio.sleep(0.05)
    await issue(eventlog, token(acme, 3))  # recorded after `short` expired

    then = await replay(db.pool, issued_at)
    assert set(tokens_by_family(then)) == {short.family_id}  # expired by now, live then
    assert tokens_by_family(then)[short.family_id].expires_at == datetime.fromtimestamp(
        expires_at, UTC
    )
    after = await replay(db.pool, await eventlog.head())
    assert set(tokens_by_family(after)) == {long_lived.family_id, token(acme, 3).family_id}
    # a moment after the long-lived one's expiry: it is not live then, though it is now
    future = await replay(db.pool, datetime.fromtimestamp(expires_at + 7200, UTC))
    assert set(tokens_by_family(future)) == {token(acme, 3).family_id}  # never expires


async def test_a_position_beyond_the_head_is_refused(eventlog: EventLog, db):
    await eventlog.append("company-c", 0, [ev.CompanyCreated(company_id="c", name="C")])
    with pytest.raises(ReplayError, match="beyond the head"):
        await replay(db.pool, 2)
    assert (await replay(db.pool, 0)).applications == []


@pytest.mark.parametrize("text", ["yesterday", "-3", "12abc", "2026-13-01", ""])
def test_unparseable_until_is_refused(text):
    with pytest.raises(ReplayError, match="position or an ISO 8601 timestamp"):
        parse_until(text)


def test_until_parses_positions_and_timestamps():
    assert parse_until("42") == 42
    assert parse_until("2026-01-02T03:04:05Z") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_until("2026-01-02T05:04:05+02:00") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_until("2026-01-02") == datetime(2026, 1, 2, tzinfo=UTC)


# --- the command -------------------------------------------------------------------------


async def test_command_writes_the_replay_to_a_file(eventlog: EventLog, db, tmp_path):
    acme = application("acme", 1)
    await app_event(eventlog, acme.client_id, acme)
    mark = await issue(eventlog, token(acme, 1))
    await eventlog.append(f"token-{token(acme, 1).family_id}", 1, [revoke(token(acme, 1))])
    output = tmp_path / "replay.json"

    code, out, err = await tollgate(
        db, "audit", "replay", "--until", str(mark), "--output", str(output)
    )

    assert code == 0, err
    exported = json.loads(output.read_text())
    assert exported == json.loads(encode(await replay(db.pool, mark)))
    assert exported["position"] == mark
    assert [t["family_id"] for t in exported["tokens"]] == [token(acme, 1).family_id]
    summary = json.loads(out)
    assert (summary["applications"], summary["tokens"]) == (1, 1)
    assert summary["output"] == str(output)


async def test_command_prints_the_replay_at_a_timestamp(eventlog: EventLog, db):
    acme = application("acme", 1)
    await app_event(eventlog, acme.client_id, acme)
    await asyncio.sleep(0.02)
    cut = datetime.now(UTC)
    await asyncio.sleep(0.02)
    await app_event(eventlog, "acme-app2", application("acme", 2))

    code, out, err = await tollgate(db, "audit", "replay", "--until", cut.isoformat())

    assert code == 0, err
    exported = json.loads(out)
    assert [a["client_id"] for a in exported["applications"]] == [acme.client_id]
    assert (exported["position"], exported["head"]) == (1, 2)


@pytest.mark.parametrize(
    ("until", "message"),
    [
        ("last-tuesday", "tollgate: --until: expected a log position or an ISO 8601 timestamp"),
        ("99", "tollgate: --until: position 99 is beyond the head of the log (1)"),
        ("9999-12-31T23:59:59-05:00", "tollgate: --until: '9999-12-31T23:59:59-05:00' is out"),
        ("0001-01-01T00:00:00+05:00", "tollgate: --until: '0001-01-01T00:00:00+05:00' is out"),
    ],
)
async def test_command_refuses_bad_input_with_one_line(eventlog: EventLog, db, until, message):
    await eventlog.append("company-c", 0, [ev.CompanyCreated(company_id="c", name="C")])
    code, out, err = await tollgate(db, "audit", "replay", "--until", until)
    assert code != 0
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(message)
    assert len([line for line in lines if line.startswith("tollgate:")]) == 1


async def test_command_refuses_an_unwritable_output(eventlog: EventLog, db, tmp_path):
    await eventlog.append("company-c", 0, [ev.CompanyCreated(company_id="c", name="C")])
    target = tmp_path / "missing" / "replay.json"
    code, _out, err = await tollgate(db, "audit", "replay", "--until", "1", "--output", str(target))
    assert code != 0
    assert err.strip().splitlines()[-1].startswith(f"tollgate: --output: cannot write {target}")


async def test_a_replay_to_a_position_missing_from_the_log_says_so_in_one_line(
    eventlog: EventLog, db
):
    """The log tampered with (a superuser deleted an event): replaying to the gap is one
    line pointing at `audit verify`, not a traceback."""
    for n in range(3):
        await eventlog.append(f"company-c{n}", 0, [ev.CompanyCreated(company_id=f"c{n}", name="C")])
    await db.pool.execute(
        "ALTER TABLE events DISABLE TRIGGER events_append_only; "
        "DELETE FROM events WHERE position = 2; "
        "ALTER TABLE events ENABLE TRIGGER events_append_only"
    )
    with pytest.raises(ReplayError, match="event 2 is missing"):
        await replay(db.pool, 2)
    code, out, err = await tollgate(db, "audit", "replay", "--until", "2")
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tollgate: --until: event 2 is missing")


async def _altered(db, position: int, change: str) -> None:
    """An event rewritten in place, as a superuser could (or as a newer version wrote it)."""
    await db.pool.execute(
        "ALTER TABLE events DISABLE TRIGGER events_append_only; "
        f"UPDATE events SET {change} WHERE position = {position}; "
        "ALTER TABLE events ENABLE TRIGGER events_append_only"
    )


UNREADABLE = [
    # written by a newer Tollgate during a roll
    ("schema_version = 99", "schema version 99"),
    # a payload that is not its type's shape
    (
        'payload = replace(payload::text, \'"grant_type":"client_credentials"\', '
        "'\"grant_type\":42')::json",
        "schema version 1",
    ),
]


@pytest.mark.parametrize(("change", "named"), UNREADABLE)
async def test_a_replay_over_an_event_it_cannot_read_stops_and_says_which(
    eventlog: EventLog, db, change, named
):
    """Before, the model passed it over: the application and its token were missing from
    a state that looked whole, and the command exited 0."""
    app = application("co-x", 1)
    await app_event(eventlog, app.client_id, app)
    await issue(eventlog, token(app, "t1"))
    await _altered(db, 1, change)
    with pytest.raises(
        ev.UnknownEventType, match=f"ApplicationCreated \\({named}\\) at position 1"
    ):
        await replay(db.pool, 2)
    code, out, err = await tollgate(db, "audit", "replay", "--until", "2")
    assert code == 1 and out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "at position 1 cannot be read by this version" in lines[0]
    assert "tollgate audit verify" in lines[0]


@pytest.mark.parametrize(("change", "named"), UNREADABLE)
@pytest.mark.parametrize(
    "command",
    [("projections", "rebuild", "applications"), ("projections", "run", "--until-caught-up")],
)
async def test_projections_that_meet_an_event_they_cannot_read_say_so_in_one_line(
    eventlog: EventLog, db, change, named, command
):
    """Before, a traceback ending in UnknownEventType or msgspec.ValidationError."""
    app = application("co-y", 1)
    await app_event(eventlog, app.client_id, app)
    await _altered(db, 1, change)
    code, _out, err = await tollgate(db, *command)
    assert code == 1 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert f"ApplicationCreated ({named}) at position 1 cannot be read by this version" in line
