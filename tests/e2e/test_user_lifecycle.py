"""A company's users over time: removal, role changes, password change and reset. Removing a
user or changing their password ends their sessions at once, in every process; the last
admin of a company stays one, even when two admins demote each other at once."""

from __future__ import annotations

import asyncio
import json
import unicodedata

import pytest
import structlog

from service import events as ev
from service.app import CONTEXT
from service.commands import directory
from service.domain import credentials
from service.domain.users import LastAdmin
from service.eventlog import EventLog, Metadata
from tests.e2e.lifecycle_helpers import add_user, freeze, second_instance, sign_in
from tests.e2e.test_admin_people import everything_stored


async def events_of(db, type_: str) -> list[dict]:
    rows = await db.pool.fetch(
        "SELECT stream_id, payload FROM events WHERE type = $1 ORDER BY position", type_
    )
    return [json.loads(r["payload"]) | {"stream": r["stream_id"]} for r in rows]


async def test_removing_a_user_ends_their_sessions_in_every_process(client, company, db, tmp_path):
    made = await add_user(client, company.auth, "clerk@acme.example", "admin")
    async with second_instance(db, tmp_path) as other:
        here = await sign_in(client, "clerk@acme.example", made["password"])
        there = await sign_in(other, "clerk@acme.example", made["password"])
        freeze(other)  # the other process has not seen the removal, and will not
        assert (await other.get("/admin/users", headers=there.headers)).status == 200
        removed = await client.delete(f"/admin/users/{made['user_id']}", headers=company.auth)
        assert removed.status == 204
        assert (await other.get("/admin/users", headers=there.headers)).status == 401
        assert (await client.get("/admin/users", headers=here.headers)).status == 401
    again = await client.post(
        "/session", json={"email": "clerk@acme.example", "password": made["password"]}
    )
    assert again.status == 401
    [event] = await events_of(db, "UserRemoved")
    assert event["user_id"] == made["user_id"]
    assert event["stream"] == f"company-{company.company_id}"
    left = await db.pool.fetchval(
        "SELECT count(*) FROM web_sessions WHERE user_id = $1", made["user_id"]
    )
    assert left == 0
    listed = await (await client.get("/admin/users", headers=company.auth)).json()
    assert made["user_id"] not in {u["user_id"] for u in listed["users"]}


@pytest.mark.parametrize("leaves", ["removed", "demoted"])
async def test_an_admins_keys_go_when_they_stop_being_an_admin(client, company, db, leaves):
    """An admin key is its issuer's: one issued from their session, and one issued with
    that key, outlived their removal or demotion, and could add a new admin for them."""
    made = await add_user(client, company.auth, "leaver@acme.example", "admin")
    session = await sign_in(client, "leaver@acme.example", made["password"])
    issued = await client.post("/admin/keys", json={"label": "ci"}, headers=session.change)
    assert issued.status == 201, await issued.text()
    first = {"Authorization": f"Bearer {(await issued.json())['admin_key']}"}
    chained = await client.post("/admin/keys", json={"label": "chained"}, headers=first)
    second = {"Authorization": f"Bearer {(await chained.json())['admin_key']}"}
    listed = (await (await client.get("/admin/keys", headers=company.auth)).json())["keys"]
    by_label = {k["label"]: k["issued_by"] for k in listed}
    assert by_label["ci"] == by_label["chained"] == made["user_id"]
    assert by_label["first admin key"] not in (None, made["user_id"])  # the first admin's
    path = f"/admin/users/{made['user_id']}"
    if leaves == "removed":
        done = await client.delete(path, headers=company.auth)
    else:
        done = await client.patch(path, json={"role": "member"}, headers=company.auth)
    assert done.status in (200, 204), await done.text()
    for key in (first, second):
        assert (await client.get("/admin/users", headers=key)).status == 401
        added = await client.post(
            "/admin/users", json={"email": "back@acme.example", "role": "admin"}, headers=key
        )
        assert added.status == 401
    assert (await client.get("/admin/users", headers=company.auth)).status == 200
    listed = (await (await client.get("/admin/keys", headers=company.auth)).json())["keys"]
    assert {k["label"]: k["revoked"] for k in listed} == {
        "first admin key": False, "ci": True, "chained": True,
    }  # fmt: skip
    assert len(await events_of(db, "AdminKeyRevoked")) == 2


@pytest.mark.parametrize("leaves", ["removed", "demoted"])
async def test_keys_issued_while_their_admin_is_removed_open_nothing(client, company, leaves):
    """Keys issued one with another, as fast as they come, while the admin is removed or
    demoted: the last one opened everything after the removal's revocations had run (each
    key issued the next before its own revocation landed), and could add a new admin. A
    later promotion brings none of them back."""
    made = await add_user(client, company.auth, "racer@acme.example", "admin")
    session = await sign_in(client, "racer@acme.example", made["password"])
    issued = await client.post("/admin/keys", json={"label": "k"}, headers=session.change)
    newest = [f"Bearer {(await issued.json())['admin_key']}"]
    stop = asyncio.Event()

    async def chain() -> None:
        while not stop.is_set():
            answer = await client.post(
                "/admin/keys", json={"label": "k"}, headers={"Authorization": newest[-1]}
            )
            if answer.status != 201:
                return
            newest.append(f"Bearer {(await answer.json())['admin_key']}")

    chaining = asyncio.ensure_future(chain())
    await asyncio.sleep(0.2)
    path = f"/admin/users/{made['user_id']}"
    if leaves == "removed":
        done = await client.delete(path, headers=company.auth)
    else:
        done = await client.patch(path, json={"role": "member"}, headers=company.auth)
    assert done.status in (200, 204)
    await asyncio.sleep(0.3)
    stop.set()
    await chaining
    assert len(newest) > 2  # the chain did run across the change
    if leaves == "demoted":
        again = await client.patch(path, json={"role": "admin"}, headers=company.auth)
        assert again.status == 200
    for key in newest:
        assert (await client.get("/admin/users", headers={"Authorization": key})).status == 401
    listed = (await (await client.get("/admin/keys", headers=company.auth)).json())["keys"]
    assert all(k["revoked"] for k in listed if k["issued_by"] == made["user_id"])


async def test_keys_issued_before_keys_named_their_admin_go_with_them(client, company, db):
    """A key recorded before AdminKeyIssued named its admin is the person's whose session
    (or key) the log says issued it: removing them revokes it, and a key it issues names
    them. Such keys outlived their admin's removal after the upgrade."""
    made = await add_user(client, company.auth, "old@acme.example", "admin")
    ctx = client.app[CONTEXT]
    legacy = {}
    for key_id, actor in (("key_legacy1", f"user:{made['user_id']}"),
                          ("key_legacy2", "admin_key:key_legacy1")):  # fmt: skip
        secret = credentials.new_admin_key()
        issued = ev.AdminKeyIssued(
            company_id=company.company_id, key_id=key_id, key_hash=credentials.digest(secret)
        )  # as recorded before: no issued_by
        await ctx.eventlog.append(f"admin-key-{key_id}", 0, [issued], Metadata(actor=actor))
        legacy[key_id] = {"Authorization": f"Bearer {secret}"}
    minted = await client.post("/admin/keys", json={"label": "new"}, headers=legacy["key_legacy2"])
    assert minted.status == 201
    listed = (await (await client.get("/admin/keys", headers=company.auth)).json())["keys"]
    assert {k["label"]: k["issued_by"] for k in listed}["new"] == made["user_id"]
    new = {"Authorization": f"Bearer {(await minted.json())['admin_key']}"}
    removed = await client.delete(f"/admin/users/{made['user_id']}", headers=company.auth)
    assert removed.status == 204
    for key in (*legacy.values(), new):
        assert (await client.get("/admin/users", headers=key)).status == 401
    assert (await client.get("/admin/users", headers=company.auth)).status == 200


async def test_the_first_admin_key_is_the_first_admins(client, db):
    """`tollgate company create` prints a key with the first admin's password: it is
    theirs, and goes with them (it outlived their removal, with every right)."""
    from tests.conftest import make_company

    beta = await make_company(client, "Beta")
    second = await add_user(client, beta.auth, "second@beta.example", "admin")
    session = await sign_in(client, "second@beta.example", second["password"])
    listed = await client.get("/admin/users", headers=session.headers)
    [first] = [u for u in (await listed.json())["users"] if u["email"] == beta.admin_email]
    removed = await client.delete(f"/admin/users/{first['user_id']}", headers=session.change)
    assert removed.status == 204
    assert (await client.get("/admin/users", headers=beta.auth)).status == 401


async def test_a_removed_users_address_can_be_given_to_a_new_user(client, company):
    first = await add_user(client, company.auth, "temp@acme.example", "member")
    await client.delete(f"/admin/users/{first['user_id']}", headers=company.auth)
    second = await add_user(client, company.auth, "temp@acme.example", "member")
    assert second["user_id"] != first["user_id"]
    assert (await sign_in(client, "temp@acme.example", second["password"])).user_id == (
        second["user_id"]
    )


async def test_changing_ones_password_ends_every_session_but_the_new_one(
    client, company, db, tmp_path
):
    made = await add_user(client, company.auth, "me@acme.example", "member")
    new_password = "a brand new long password"
    async with second_instance(db, tmp_path) as other:
        here = await sign_in(client, "me@acme.example", made["password"])
        there = await sign_in(other, "me@acme.example", made["password"])
        freeze(other)
        with structlog.testing.capture_logs() as logs:
            changed = await client.post(
                "/session/password",
                json={"current_password": made["password"], "new_password": new_password},
                headers=here.change,
            )
        assert changed.status == 200, await changed.text()
        assert changed.headers["Cache-Control"] == "no-store"
        fresh = changed.cookies["tg_session"].value
        client.session.cookie_jar.clear()
        # the member's session answers 403 (members manage nothing), a dead one 401
        assert (await other.get("/admin/users", headers=there.headers)).status == 401
        assert (await client.get("/admin/users", headers=here.headers)).status == 401
        cookie = {"Cookie": f"tg_session={fresh}"}
        assert (await client.get("/admin/users", headers=cookie)).status == 403
    old = await client.post(
        "/session", json={"email": "me@acme.example", "password": made["password"]}
    )
    assert old.status == 401
    await sign_in(client, "me@acme.example", new_password)
    [event] = await events_of(db, "UserPasswordChanged")
    assert event["user_id"] == made["user_id"] and event["password_hash"].startswith(
        "nfkc$argon2id$"
    )
    stored = await everything_stored(db)
    assert new_password not in stored and new_password not in repr(logs)


async def test_a_password_change_needs_the_current_password(client, company, db):
    made = await add_user(client, company.auth, "me@acme.example", "member")
    me = await sign_in(client, "me@acme.example", made["password"])
    wrong = await client.post(
        "/session/password",
        json={"current_password": "not my password at all", "new_password": "x" * 24},
        headers=me.change,
    )
    assert wrong.status == 403
    assert (await wrong.json())["error"] == "invalid_credentials"
    no_csrf = await client.post(
        "/session/password",
        json={"current_password": made["password"], "new_password": "y" * 24},
        headers=me.headers,
    )
    assert no_csrf.status == 403
    weak = await client.post(
        "/session/password",
        json={"current_password": made["password"], "new_password": "short"},
        headers=me.change,
    )
    assert weak.status == 400 and "new_password" in (await weak.json())["error_description"]
    key = await client.post(
        "/session/password",
        json={"current_password": made["password"], "new_password": "z" * 24},
        headers=company.auth,
    )
    assert key.status == 403  # an admin key is no person with a password
    assert await events_of(db, "UserPasswordChanged") == []


async def test_an_admin_reset_shows_a_generated_password_once_and_ends_sessions(
    client, company, db
):
    made = await add_user(client, company.auth, "forgetful@acme.example", "admin")
    session = await sign_in(client, "forgetful@acme.example", made["password"])
    reset = await client.post(
        f"/admin/users/{made['user_id']}/reset-password", headers=company.auth
    )
    assert reset.status == 200, await reset.text()
    assert reset.headers["Cache-Control"] == "no-store"
    password = (await reset.json())["password"]
    assert len(password) >= 20
    assert (await client.get("/admin/users", headers=session.headers)).status == 401
    await sign_in(client, "forgetful@acme.example", password)
    chosen = await client.post(
        f"/admin/users/{made['user_id']}/reset-password",
        json={"password": "chosen by the admin, long enough"},
        headers=company.auth,
    )
    assert chosen.status == 200 and "password" not in await chosen.json()
    await sign_in(client, "forgetful@acme.example", "chosen by the admin, long enough")
    assert password not in await everything_stored(db)


async def test_a_session_opened_with_a_password_changed_since_is_worth_nothing(client, company, db):
    """The race a reset can lose: another process checks the old password against its
    model a moment before the reset reaches it, and opens a session after the reset has
    ended every session there was. The session carries the version of the password it
    was opened with, and one older than the user's is refused; a session from before
    sessions carried it, and one opened with the new password, are not."""
    from service.web import sessions

    made = await add_user(client, company.auth, "raced@acme.example", "admin")
    ctx = client.app[CONTEXT]
    old_version = ctx.directory.users[made["user_id"]].version
    reset = await client.post(
        f"/admin/users/{made['user_id']}/reset-password",
        json={"password": "the new one, long enough"},
        headers=company.auth,
    )
    assert reset.status == 200
    # what the other process wrote: a session of the old password, after the reset
    stale, _csrf = await sessions.create(
        db.pool, made["user_id"], company.company_id, user_version=old_version
    )
    unversioned, _csrf = await sessions.create(db.pool, made["user_id"], company.company_id)

    async def admin_users(cookie: str) -> int:
        answer = await client.get("/admin/users", headers={"Cookie": f"tg_session={cookie}"})
        client.session.cookie_jar.clear()
        return answer.status

    assert await admin_users(stale) == 401
    assert await admin_users(unversioned) == 200
    fresh = await sign_in(client, "raced@acme.example", "the new one, long enough")
    assert await admin_users(fresh.cookie) == 200
    opened = await db.pool.fetchval(
        "SELECT user_version FROM web_sessions WHERE session_hash = $1",
        credentials.digest(fresh.cookie),
    )
    assert opened == ctx.directory.users[made["user_id"]].version > old_version


async def test_an_admin_cannot_reset_their_own_password_through_the_api(client, company, db):
    """One's own password is changed with the current one (POST /session/password): a
    stolen session and its CSRF token are not enough to set a new one, as on the dashboard."""
    made = await add_user(client, company.auth, "hank@acme.example", "admin")
    session = await sign_in(client, "hank@acme.example", made["password"])
    refused = await client.post(
        f"/admin/users/{made['user_id']}/reset-password",
        json={"password": "attacker-chosen-password"},
        headers=session.change,
    )
    assert refused.status == 403, await refused.text()
    assert await events_of(db, "UserPasswordChanged") == []
    # another admin's reset of it still works, and so does one with an admin key
    other = await client.post(
        f"/admin/users/{made['user_id']}/reset-password", headers=company.auth
    )
    assert other.status == 200


async def test_an_address_signs_in_in_any_form_it_was_added_in(client, company, db):
    """Accounts are kept under the address as email-validator normalises it (NFC, the
    domain in Unicode); sign-in reads what is typed the same way, so a decomposed form, a
    punycode domain or spaces around it open the account, and count toward one throttle."""
    import unicodedata

    added = "\u00fcn\u00ef@b\u00fccher.example"  # composed
    made = await add_user(client, company.auth, added, "member")
    for typed in (
        unicodedata.normalize("NFD", added),
        "\u00fcn\u00ef@xn--bcher-kva.example",
        f"  {added.upper()}  ",
    ):
        signed = await client.post("/session", json={"email": typed, "password": made["password"]})
        assert signed.status == 200, (typed, await signed.text())
        assert (await signed.json())["user_id"] == made["user_id"]


async def test_another_companys_user_is_not_found(client, company, other_company):
    theirs = await add_user(client, other_company.auth, "x@globex.example", "member")
    user = f"/admin/users/{theirs['user_id']}"
    assert (await client.delete(user, headers=company.auth)).status == 404
    patched = await client.patch(user, json={"role": "admin"}, headers=company.auth)
    assert patched.status == 404
    reset = await client.post(f"{user}/reset-password", headers=company.auth)
    assert reset.status == 404


async def test_roles_change_and_the_last_admin_stays(client, company, db):
    made = await add_user(client, company.auth, "clerk@acme.example", "member")
    promoted = await client.patch(
        f"/admin/users/{made['user_id']}", json={"role": "admin"}, headers=company.auth
    )
    assert promoted.status == 200
    assert (await promoted.json())["role"] == "admin"
    clerk = await sign_in(client, "clerk@acme.example", made["password"])
    first_admin = next(
        u["user_id"]
        for u in (await (await client.get("/admin/users", headers=company.auth)).json())["users"]
        if u["email"] == company.admin_email
    )
    removed = await client.delete(f"/admin/users/{first_admin}", headers=clerk.change)
    assert removed.status == 204
    # The first admin key went with the first admin: the clerk is the admin left.
    assert (await client.get("/admin/users", headers=company.auth)).status == 401
    for attempt in (
        client.patch(f"/admin/users/{made['user_id']}", json={"role": "member"},
                     headers=clerk.change),
        client.delete(f"/admin/users/{made['user_id']}", headers=clerk.change),
    ):  # fmt: skip
        refused = await attempt
        assert refused.status == 409
        assert (await refused.json())["error"] == "last_admin"
    changes = await events_of(db, "UserRoleChanged")
    assert [(c["user_id"], c["before"], c["after"]) for c in changes] == [
        (made["user_id"], "member", "admin")
    ]


async def two_admins(client, company):
    made = await add_user(client, company.auth, "second@acme.example", "admin")
    users = (await (await client.get("/admin/users", headers=company.auth)).json())["users"]
    first = next(u["user_id"] for u in users if u["email"] == company.admin_email)
    return first, made["user_id"], made["password"]


async def test_two_admins_demoting_each_other_at_once_leave_one_admin(
    client, company, db, tmp_path
):
    first, second, password = await two_admins(client, company)
    async with second_instance(db, tmp_path) as other:
        one = await sign_in(client, company.admin_email, company.admin_password)
        two = await sign_in(other, "second@acme.example", password)
        answers = await asyncio.gather(
            client.patch(f"/admin/users/{second}", json={"role": "member"}, headers=one.change),
            other.patch(f"/admin/users/{first}", json={"role": "member"}, headers=two.change),
        )
    assert sorted(a.status for a in answers) == [200, 409]
    assert len(await events_of(db, "UserRoleChanged")) == 1


async def test_a_demotion_decided_on_a_stale_view_is_decided_again(client, company, db):
    """Another process demotes the other admin just after this decision looked at the
    company: the append's condition on the company stream refuses the stale decision, and
    the decision taken again sees one admin left."""
    first, second, _ = await two_admins(client, company)
    ctx = client.app[CONTEXT]
    real_refresh, real_record = ctx.refresh, ctx.record
    decisions = 0

    async def counted_refresh() -> None:
        nonlocal decisions
        decisions += 1  # each decision looks at the company after catching up
        await real_refresh()

    async def another_process_demotes_first(stream_id, expected_version, events, meta, **kw):
        # The decision is taken (on two admins); another process commits before its append,
        # at the version the decision saw. (Committed any earlier, this process's follower
        # could apply it before the decision looks, and there would be nothing stale.)
        if decisions == 1:
            elsewhere = EventLog(db.pool)
            await elsewhere.start()
            try:
                demoted = ev.UserRoleChanged(
                    company_id=company.company_id, user_id=second, before="admin", after="member"
                )
                await elsewhere.append(stream_id, expected_version, [demoted])
            finally:
                await elsewhere.close()
        return await real_record(stream_id, expected_version, events, meta, **kw)

    ctx.refresh = counted_refresh  # type: ignore[method-assign]
    ctx.record = another_process_demotes_first  # type: ignore[method-assign]
    with pytest.raises(LastAdmin):
        await directory.change_role(ctx, company.company_id, first, "member", Metadata(actor="t"))
    assert decisions == 2
    assert len(await events_of(db, "UserRoleChanged")) == 1


async def test_the_same_password_composed_otherwise_is_no_new_password(client, company, db):
    composed = unicodedata.normalize("NFC", "crème brûlée à la française")
    response = await client.post(
        "/admin/users",
        json={"email": "chef@acme.example", "role": "member", "password": composed},
        headers=company.auth,
    )
    assert response.status == 201, await response.text()
    apart = unicodedata.normalize("NFD", composed)
    me = await sign_in(client, "chef@acme.example", apart)  # one password, either form
    same = await client.post(
        "/session/password",
        json={"current_password": composed, "new_password": apart},
        headers=me.change,
    )
    assert same.status == 400
    assert "must differ" in (await same.json())["error_description"]
    assert await events_of(db, "UserPasswordChanged") == []
