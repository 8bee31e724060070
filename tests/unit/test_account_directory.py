"""The in-memory directory keeps one live account per company and address: the same address
at several companies, and users created on the address-wide stream, side by side."""

from __future__ import annotations

import inspect
import re
from datetime import UTC, datetime
from itertools import count

from projections import directory
from projections.directory import DirectoryModel
from service import events as ev
from service.eventlog import Metadata, RecordedEvent

_positions = count(1)


def recorded(event: ev.Event, version: int = 1) -> RecordedEvent:
    """As the memory feed reads it: lean, without the stream's name."""
    return RecordedEvent(
        next(_positions), "", version, type(event).__name__, 1, None, event, Metadata(),
        datetime.now(UTC), b"",
    )  # fmt: skip


def added(company_id: str, user_id: str, email: str) -> RecordedEvent:
    return recorded(
        ev.UserAdded(
            company_id=company_id, user_id=user_id, email=email, role="member", password_hash="h"
        )
    )


def test_one_address_has_an_account_at_each_company():
    model = DirectoryModel()
    model.apply(
        [added("co_a", "usr_a", "Pat@Example.com"), added("co_b", "usr_b", "pat@example.com")]
    )
    assert [u.user_id for u in model.accounts("PAT@example.com")] == ["usr_a", "usr_b"]
    assert model.account("co_a", "pat@example.com").user_id == "usr_a"
    assert model.account("co_b", "pat@example.com").user_id == "usr_b"
    assert model.account("co_c", "pat@example.com") is None


def test_a_removed_account_leaves_the_others_and_frees_its_company():
    model = DirectoryModel()
    model.apply([
        added("co_a", "usr_a", "pat@example.com"),
        added("co_b", "usr_b", "pat@example.com"),
        recorded(ev.UserRemoved(company_id="co_a", user_id="usr_a"), 2),
    ])  # fmt: skip
    assert [u.user_id for u in model.accounts("pat@example.com")] == ["usr_b"]
    assert model.account("co_a", "pat@example.com") is None
    model.apply([added("co_a", "usr_a2", "pat@example.com")])
    assert model.account("co_a", "pat@example.com").user_id == "usr_a2"
    model.apply([
        recorded(ev.UserRemoved(company_id="co_a", user_id="usr_a2"), 3),
        recorded(ev.UserRemoved(company_id="co_b", user_id="usr_b"), 4),
    ])  # fmt: skip
    assert model.accounts("pat@example.com") == []
    assert model.user_by_email("pat@example.com") is None


def test_a_password_change_moves_only_its_own_account():
    model = DirectoryModel()
    model.apply(
        [added("co_a", "usr_a", "pat@example.com"), added("co_b", "usr_b", "pat@example.com")]
    )
    model.apply([
        recorded(ev.UserPasswordChanged(company_id="co_a", user_id="usr_a", password_hash="n"), 2)
    ])  # fmt: skip
    assert (model.users["usr_a"].password_hash, model.users["usr_a"].version) == ("n", 2)
    assert (model.users["usr_b"].password_hash, model.users["usr_b"].version) == ("h", 1)


def test_every_event_the_directory_acts_on_reaches_it():
    """The model passes by the types it does not hold without testing them one by one: a
    type `_apply` acts on and the pass-by set forgets would never change the directory."""
    named = re.findall(r"\bev\.([A-Z]\w+)", inspect.getsource(DirectoryModel._apply))
    acted_on = set(named) - {"Event"}  # the parameter's annotation
    assert acted_on, "no event type found in DirectoryModel._apply"
    assert acted_on == {t.__name__ for t in directory._HANDLED}


def test_a_token_event_moves_the_directory_on_and_changes_nothing_else():
    model = DirectoryModel()
    model.apply([added("co_a", "usr_a", "pat@example.com")])
    token = recorded(
        ev.AccessTokenIssued(
            company_id="co_a", client_id="app", family_id="fam_x", grant_type="client_credentials",
            token_hash="00" * 32, permissions=[], issued_at=1, expires_at=None,
        )
    )  # fmt: skip
    model.apply([token])
    assert model.position == token.position
    assert [u.user_id for u in model.accounts("pat@example.com")] == ["usr_a"]


def key(key_id: str, issued_by: str | None, company_id: str = "co_a") -> RecordedEvent:
    return recorded(
        ev.AdminKeyIssued(
            company_id=company_id, key_id=key_id, key_hash=key_id * 8, issued_by=issued_by
        )
    )


def role(user_id: str, before: str, after: str) -> RecordedEvent:
    return recorded(
        ev.UserRoleChanged(company_id="co_a", user_id=user_id, before=before, after=after)
    )


def test_an_admins_keys_end_with_their_admin_rights_whatever_the_order():
    """A key is its admin's: it ends when they are removed or demoted, recorded before or
    after it (a key issued as its admin was being removed, which the removal's revocations
    did not see, opened everything), and a later promotion does not bring it back."""
    model = DirectoryModel()
    admin = ev.UserAdded(
        company_id="co_a", user_id="usr_a", email="a@example.com", role="admin", password_hash="h"
    )
    model.apply([recorded(admin), key("k1", "usr_a"), key("k0", None), key("kx", "usr_a", "co_b")])
    keys = model.admin_keys
    assert keys["k1"].live and keys["k0"].live
    assert not keys["kx"].live  # another company's key naming this admin opens nothing
    model.apply([role("usr_a", "admin", "member"), key("k2", "usr_a")])
    assert not keys["k1"].live and not keys["k2"].live and keys["k0"].live
    model.apply([role("usr_a", "member", "admin"), key("k3", "usr_a")])
    assert not keys["k1"].live and not keys["k2"].live and keys["k3"].live
    model.apply([recorded(ev.UserRemoved(company_id="co_a", user_id="usr_a")), key("k4", "usr_a")])
    assert not any(keys[k].live for k in ("k1", "k2", "k3", "k4")) and keys["k0"].live
    assert not any(keys[k].revoked for k in keys)  # nothing of it recorded a revocation
