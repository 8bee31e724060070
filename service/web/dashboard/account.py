"""The signed-in user's own account: their password, changed by proving the current one.
The one dashboard page a member may open (SPEC: password change for oneself)."""

from __future__ import annotations

from aiohttp import web

from service.commands.directory import WrongPassword
from service.errors import TollgateError
from service.web.dashboard.base import (
    PASSWORD_PAGE,
    Admin,
    Form,
    change,
    page,
    render,
    routes,
    see_other,
)
from service.web.dashboard.once import Notice
from service.web.login import TooManyAttempts, change_own_password


async def _password_page(request: web.Request, admin: Admin) -> web.Response:
    return _form(request, admin, [])


def _form(
    request: web.Request, admin: Admin, problems: list[str], status: int = 400
) -> web.Response:
    return render(
        request, admin, "dashboard/password.html", title="Your password", section="password",
        problems=problems, status=status if problems else 200,
    )  # fmt: skip


async def _change(request: web.Request, admin: Admin, form: Form) -> web.Response:
    current, new = form.get("current_password"), form.get("new_password")
    if form.get("confirm_password") != new:
        return _form(request, admin, ["The new password and its confirmation differ."])
    try:
        value, csrf = await change_own_password(
            request, admin.user_id, admin.company_id, current, new
        )
    except TooManyAttempts as exc:
        wait = exc.headers["Retry-After"]
        refused = _form(request, admin, [f"Too many attempts: try again in {wait} seconds."], 429)
        refused.headers["Retry-After"] = wait
        return refused
    except WrongPassword:
        return _form(request, admin, ["The current password is wrong."], 403)
    except TollgateError as exc:  # a weak new password, or a change made meanwhile
        return _form(request, admin, [_sentence(exc.description)], exc.status)
    # Every session of this user has ended, this one too: the answer carries the new one,
    # and the notice is sealed for it.
    admin.session_value, admin.csrf = value, csrf
    admin.cookies.append(("", value, "/"))
    notice = Notice("Password changed. You are signed out everywhere else.")
    return see_other(request, admin, PASSWORD_PAGE, notice)


def _sentence(description: str) -> str:
    text = description.removeprefix("new_password: ")
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


routes.get(PASSWORD_PAGE)(page(_password_page, anyone=True))
routes.post(PASSWORD_PAGE)(change(_change, anyone=True))
