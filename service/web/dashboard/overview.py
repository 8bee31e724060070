"""GET /dashboard, the overview (applications, live tokens, IP violations, recent
changes, from the SQL read models and the log), and signing in and out."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from service.audit.history import COMPANY_IS
from service.context import Context
from service.web import pages, sessions
from service.web.bodies import form_body
from service.web.dashboard.base import (
    LOGIN_CSRF_COOKIE,
    TOKEN_COOKIE,
    Admin,
    error,
    login_form,
    page,
    render,
    routes,
)
from service.web.dashboard.describe import Describer, app_namer
from service.web.keys import CONTEXT
from service.web.login import InvalidCredentials, authenticate, set_session_cookie

RECENT = 20


@routes.post("/dashboard/login")
async def login(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    form = await form_body(request)
    presented = str(form.get("csrf_token", ""))
    if not pages.login_csrf_ok(request, LOGIN_CSRF_COOKIE, presented):
        return login_form(request, "The form expired. Please sign in again.", status=403)
    email, password = str(form.get("email", "")), str(form.get("password", ""))
    try:
        user = await authenticate(request, email[:320], password[:256])
    except InvalidCredentials as exc:
        return login_form(request, exc.description, status=exc.status)
    value, _csrf = await sessions.create(
        ctx.pool, user.user_id, user.company_id, user_version=user.version,
        replacing=request.cookies.get(sessions.COOKIE),
    )  # fmt: skip
    response = web.HTTPSeeOther("/dashboard")
    set_session_cookie(request, response, value)
    response.del_cookie(TOKEN_COOKIE, path="/dashboard")
    raise response


@routes.get("/dashboard/login")
async def login_again(request: web.Request) -> web.StreamResponse:
    """The address a failed sign-in leaves in the address bar, opened again: the form."""
    raise web.HTTPSeeOther("/dashboard")


@routes.post("/dashboard/logout")
async def logout(request: web.Request) -> web.StreamResponse:
    """Needs the session's CSRF token, or another site could sign the admin out: without
    it a live session is left as it is, its cookies too. Cookies of a session that has
    ended are cleared."""
    ctx = request.app[CONTEXT]
    form = await form_body(request)
    value = request.cookies.get(sessions.COOKIE)
    session = await sessions.load(ctx.pool, value) if value else None
    presented = str(form.get("csrf_token", ""))
    if value and session is not None:
        if not (presented.isascii() and session.csrf_ok(presented)):
            return error("Form expired", "The form expired. Open the page again.", 403)
        await sessions.delete(ctx.pool, value)
    response = web.HTTPSeeOther("/dashboard")
    response.del_cookie(sessions.COOKIE, path="/")
    response.del_cookie(TOKEN_COOKIE, path="/dashboard")
    raise response


@routes.get("/dashboard")
@page
async def overview(request: web.Request, admin: Admin) -> web.Response:
    ctx = request.app[CONTEXT]
    data = await _overview(ctx, admin.company_id)
    describe = Describer(ctx, admin.company_id, app_namer(ctx, admin.company_id))
    return render(
        request, admin, "dashboard/overview.html",
        title=f"{admin.company or 'Company'} dashboard", section="overview",
        recent=RECENT, describe=describe, **data,
    )  # fmt: skip


async def _overview(ctx: Context, company_id: str) -> dict[str, Any]:
    """Every query is scoped by the company; each reads an index, not the whole log."""
    async with ctx.pool.acquire() as conn:
        applications = await conn.fetch(
            "SELECT client_id, name, grant_type, ip_allowlist, permissions FROM applications "
            "WHERE company_id = $1 ORDER BY lower(name), client_id",
            company_id,
        )
        counts = await conn.fetch(
            "SELECT client_id, live_tokens FROM v_live_tokens_per_application "
            "WHERE company_id = $1",
            company_id,
        )
        # Newest first down the (company_id, position) index; see history.COMPANY_IS.
        violations = await conn.fetch(
            "SELECT recorded_at, client_id, ip, endpoint, token_revoked FROM v_ip_violations "
            f"WHERE {COMPANY_IS.format(n=1)} ORDER BY company_id DESC, position DESC LIMIT $2",
            company_id,
            RECENT,
        )
        changes = await conn.fetch(
            "SELECT recorded_at, type, actor, client_ip, payload FROM v_admin_changes "
            f"WHERE {COMPANY_IS.format(n=1)} ORDER BY company_id DESC, position DESC LIMIT $2",
            company_id,
            RECENT,
        )
    return {
        "applications": [dict(r) for r in applications],
        "live_tokens": {r["client_id"]: r["live_tokens"] for r in counts},
        "violations": [dict(r) for r in violations],
        "changes": [dict(r) | {"payload": json.loads(r["payload"])} for r in changes],
    }
