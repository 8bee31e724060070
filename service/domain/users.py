"""Company users' roles and removal: the rules, as functions from the company's live users
(user id → role) to events. A company always keeps at least one admin."""

from __future__ import annotations

from collections.abc import Mapping

from service import events as ev
from service.domain.applications import FieldError
from service.errors import Conflict, NotFound

ROLES = ("admin", "member")
ADMIN = "admin"


class LastAdmin(Conflict):
    """Nobody could manage the company's applications, users and keys any more."""

    error = "last_admin"

    def __init__(self) -> None:
        super().__init__("the last admin of a company cannot be removed or demoted")


def _check(users: Mapping[str, str], user_id: str) -> str:
    role = users.get(user_id)
    if role is None:
        raise NotFound("no such user")
    return role


def _is_last_admin(users: Mapping[str, str], user_id: str) -> bool:
    return users.get(user_id) == ADMIN and sum(r == ADMIN for r in users.values()) == 1


def change_role(
    company_id: str, users: Mapping[str, str], user_id: str, role: str
) -> ev.UserRoleChanged | None:
    """The change, or None when the user already has `role`."""
    if role not in ROLES:
        raise FieldError("role", "must be admin or member")
    before = _check(users, user_id)
    if before == role:
        return None
    if _is_last_admin(users, user_id):
        raise LastAdmin()
    return ev.UserRoleChanged(company_id=company_id, user_id=user_id, before=before, after=role)


def remove(company_id: str, users: Mapping[str, str], user_id: str) -> ev.UserRemoved:
    _check(users, user_id)
    if _is_last_admin(users, user_id):
        raise LastAdmin()
    return ev.UserRemoved(company_id=company_id, user_id=user_id)
