"""A company's users: role changes and removal keep at least one admin."""

from __future__ import annotations

import pytest

from service import events as ev
from service.domain import users
from service.domain.applications import FieldError
from service.errors import NotFound

TWO_ADMINS = {"usr_a": "admin", "usr_b": "admin", "usr_m": "member"}
ONE_ADMIN = {"usr_a": "admin", "usr_m": "member"}


def test_an_admin_may_be_demoted_while_another_remains():
    event = users.change_role("co", TWO_ADMINS, "usr_b", "member")
    assert event == ev.UserRoleChanged(company_id="co", user_id="usr_b", before="admin",
                                       after="member")  # fmt: skip


def test_the_last_admin_cannot_be_demoted_or_removed():
    with pytest.raises(users.LastAdmin) as refused:
        users.change_role("co", ONE_ADMIN, "usr_a", "member")
    assert refused.value.status == 409 and refused.value.error == "last_admin"
    with pytest.raises(users.LastAdmin):
        users.remove("co", ONE_ADMIN, "usr_a")


def test_a_member_may_be_removed_or_promoted_whatever_the_admins():
    assert users.remove("co", ONE_ADMIN, "usr_m") == ev.UserRemoved(company_id="co",
                                                                    user_id="usr_m")  # fmt: skip
    assert users.change_role("co", ONE_ADMIN, "usr_m", "admin") is not None


def test_the_same_role_again_changes_nothing():
    assert users.change_role("co", ONE_ADMIN, "usr_a", "admin") is None


def test_unknown_users_and_roles_are_refused():
    with pytest.raises(NotFound):
        users.remove("co", ONE_ADMIN, "usr_gone")
    with pytest.raises(FieldError):
        users.change_role("co", ONE_ADMIN, "usr_m", "owner")
