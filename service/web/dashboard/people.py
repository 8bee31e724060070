"""The dashboard's People and Admin keys pages: add, remove, change role and reset the
password of users; issue (shown once) and revoke admin keys."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from service.commands import directory as commands
from service.domain import passwords
from service.domain.applications import FieldError
from service.errors import Conflict, NotFound
from service.web.dashboard.base import Admin, Form, change, page, render, routes, see_other
from service.web.dashboard.once import Notice
from service.web.keys import CONTEXT

PEOPLE = "/dashboard/people"
KEYS = "/dashboard/keys"


def _user_email(request: web.Request, admin: Admin, user_id: str) -> str:
    user = request.app[CONTEXT].directory.users.get(user_id)
    if user is None or user.removed or user.company_id != admin.company_id:
        raise NotFound("no such user")
    return user.email


@routes.get(PEOPLE)
@page
async def people_page(request: web.Request, admin: Admin) -> web.Response:
    return _people(request, admin, {"role": "member"}, [])


def _people(
    request: web.Request, admin: Admin, values: dict[str, Any], problems: list[str]
) -> web.Response:
    users = sorted(
        request.app[CONTEXT].directory.company_users(admin.company_id), key=lambda u: u.email
    )
    return render(
        request, admin, "dashboard/people.html", title="People", section="people",
        users=users, roles=commands.ROLES, values=values, problems=problems,
        status=400 if problems else 200,
    )  # fmt: skip


@routes.post(PEOPLE)
@change
async def add(request: web.Request, admin: Admin, form: Form) -> web.Response:
    ctx = request.app[CONTEXT]
    email, role, given = form.get("email").strip(), form.get("role"), form.get("password")
    password = given or passwords.generate_password()
    try:
        await commands.add_user(ctx, admin.company_id, email, role, password, admin.meta(request))
    except (FieldError, Conflict) as exc:
        return _people(request, admin, {"email": email, "role": role}, [exc.description])
    if given:
        return see_other(request, admin, PEOPLE, Notice(f"{email} added as {role}."))
    notice = Notice(f"{email} added as {role}. Give them this password.", "Password", password)
    return see_other(request, admin, PEOPLE, notice)


@routes.post(PEOPLE + "/{user_id}/role")
@change
async def role(request: web.Request, admin: Admin, form: Form) -> web.Response:
    user_id = request.match_info["user_id"]
    email = _user_email(request, admin, user_id)
    new = form.get("role")
    await commands.change_role(
        request.app[CONTEXT], admin.company_id, user_id, new, admin.meta(request)
    )
    return see_other(request, admin, PEOPLE, Notice(f"{email} is now {new}."))


@routes.post(PEOPLE + "/{user_id}/reset-password")
@change
async def reset_password(request: web.Request, admin: Admin, form: Form) -> web.Response:
    user_id = request.match_info["user_id"]
    email = _user_email(request, admin, user_id)
    if user_id == admin.user_id:
        # It would end this very session: change your own password where you prove it.
        return see_other(request, admin, PEOPLE, Notice("You cannot reset your own password."))
    password = await commands.reset_password(
        request.app[CONTEXT], admin.company_id, user_id, admin.meta(request)
    )
    notice = Notice(f"New password for {email}; their sessions have ended.", "Password", password)
    return see_other(request, admin, PEOPLE, notice)


@routes.get(PEOPLE + "/{user_id}/remove")
@page
async def remove_page(request: web.Request, admin: Admin) -> web.Response:
    user_id = request.match_info["user_id"]
    email = _user_email(request, admin, user_id)
    return render(
        request, admin, "dashboard/person_remove.html", title=f"Remove {email}",
        section="people", user_id=user_id, email=email,
    )  # fmt: skip


@routes.post(PEOPLE + "/{user_id}/remove")
@change
async def remove(request: web.Request, admin: Admin, form: Form) -> web.Response:
    user_id = request.match_info["user_id"]
    email = _user_email(request, admin, user_id)
    await commands.remove_user(request.app[CONTEXT], admin.company_id, user_id, admin.meta(request))
    return see_other(
        request, admin, PEOPLE, Notice(f"{email} removed; they can no longer sign in.")
    )


# --- admin keys ----------------------------------------------------------------------


@routes.get(KEYS)
@page
async def keys_page(request: web.Request, admin: Admin) -> web.Response:
    return _keys(request, admin, "", [])


def _keys(request: web.Request, admin: Admin, label: str, problems: list[str]) -> web.Response:
    directory = request.app[CONTEXT].directory
    keys = directory.company_keys(admin.company_id)
    issuers = {
        k.key_id: directory.users[k.issued_by].email for k in keys if k.issued_by in directory.users
    }
    return render(
        request, admin, "dashboard/keys.html", title="Admin keys", section="keys",
        keys=sorted(keys, key=lambda k: (not k.live, k.label.lower(), k.key_id)), label=label,
        issuers=issuers, problems=problems, status=400 if problems else 200,
    )  # fmt: skip


@routes.post(KEYS)
@change
async def issue(request: web.Request, admin: Admin, form: Form) -> web.Response:
    label = form.get("label").strip()
    try:
        _key_id, key = await commands.issue_admin_key(
            request.app[CONTEXT], admin.company_id, label, admin.meta(request)
        )
    except FieldError as exc:
        return _keys(request, admin, label, [exc.description])
    notice = Notice(f"Admin key “{label or 'unlabelled'}” issued.", "Admin key", key)
    return see_other(request, admin, KEYS, notice)


@routes.post(KEYS + "/{key_id}/revoke")
@change
async def revoke(request: web.Request, admin: Admin, form: Form) -> web.Response:
    key_id = request.match_info["key_id"]
    await commands.revoke_admin_key(
        request.app[CONTEXT], admin.company_id, key_id, admin.meta(request)
    )
    key = request.app[CONTEXT].directory.admin_keys[key_id]
    message = f"Admin key “{key.label or key_id}” revoked; it opens nothing from now on."
    return see_other(request, admin, KEYS, Notice(message))
