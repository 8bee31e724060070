"""GET /dashboard: a company admin's overview, rendered on the server from the SQL read
models and the log (applications, live tokens, IP violations, recent changes)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any

from aiohttp import web

from service.audit.history import COMPANY_IS
from service.context import Context
from service.domain import credentials
from service.web import pages, sessions
from service.web.auth import signed_in
from service.web.bodies import form_body
from service.web.keys import CONTEXT
from service.web.login import InvalidCredentials, authenticate, set_session_cookie

routes = web.RouteTableDef()

LOGIN_CSRF_COOKIE = "tg_dashboard_csrf"
RECENT = 20

# The shared page is sized for a login form; tables need the width. (CSP allows inline
# styles: style-src 'unsafe-inline'.)
_STYLE = """<style>
main { width: min(72rem, 96vw); }
header { display: flex; justify-content: space-between; align-items: baseline; gap: 1rem;
         flex-wrap: wrap; }
header form button { margin-top: 0; }
section { margin-top: 2rem; }
h2 { font-size: 1.1rem; margin: 0 0 .5rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .92rem; }
caption { text-align: left; font-weight: 600; padding: .25rem 0 .5rem; }
th, td { text-align: left; vertical-align: top; padding: .4rem .6rem;
         border-bottom: 1px solid color-mix(in srgb, CanvasText 15%, transparent); }
thead th { border-bottom-width: 2px; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
code { font-family: ui-monospace, monospace; font-size: .9em; overflow-wrap: anywhere; }
</style>"""


@dataclass(frozen=True)
class Admin:
    email: str
    company_id: str
    company: str


@dataclass(frozen=True)
class Overview:
    applications: list[Mapping[str, Any]]
    live_tokens: dict[str, int]
    violations: list[Mapping[str, Any]]
    changes: list[Mapping[str, Any]]


# --- signing in and out --------------------------------------------------------------


async def _signed_in(request: web.Request, ctx: Context) -> tuple[str, str] | None:
    """(user id, role) of the session's user, if there is a live session."""
    found = await signed_in(request, ctx)
    return None if found is None else (found[1].user_id, found[1].role)


def _login(request: web.Request, message: str | None = None, status: int = 200) -> web.Response:
    return pages.sign_in_form(
        request, cookie=LOGIN_CSRF_COOKIE, path="/dashboard", action="/dashboard/login",
        fields={}, message=message, status=status,
    )  # fmt: skip


def logout_token(request: web.Request) -> str:
    """The sign-out form's CSRF token, derived from the session cookie (which another site
    can neither read nor send with a cross-site POST)."""
    return credentials.digest("dashboard-logout:" + request.cookies.get(sessions.COOKIE, ""))


@routes.post("/dashboard/login")
async def login(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    form = await form_body(request)
    presented = str(form.get("csrf_token", ""))
    if not pages.login_csrf_ok(request, LOGIN_CSRF_COOKIE, presented):
        return _login(request, "The form expired. Please sign in again.", status=403)
    email, password = str(form.get("email", "")), str(form.get("password", ""))
    try:
        user_id = await authenticate(request, email[:320], password[:256])
    except InvalidCredentials as exc:
        return _login(request, exc.description, status=exc.status)
    user = ctx.directory.users[user_id]
    value, _csrf = await sessions.create(ctx.pool, user_id, user.company_id)
    response = web.HTTPSeeOther("/dashboard")
    set_session_cookie(request, response, value)
    raise response


@routes.post("/dashboard/logout")
async def logout(request: web.Request) -> web.StreamResponse:
    form = await form_body(request)
    value = request.cookies.get(sessions.COOKIE)
    presented = str(form.get("csrf_token", ""))
    if value and hmac.compare_digest(presented.encode(), logout_token(request).encode()):
        await sessions.delete(request.app[CONTEXT].pool, value)
    response = web.HTTPSeeOther("/dashboard")
    response.del_cookie(sessions.COOKIE, path="/")
    raise response


# --- the page ------------------------------------------------------------------------


@routes.get("/dashboard")
async def dashboard(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    signed_in = await _signed_in(request, ctx)
    if signed_in is None:
        return _login(request)
    user_id, role = signed_in
    if role != "admin":
        return pages.error_page(
            "Admins only", "Only company admins can see the dashboard.", status=403
        )
    user = ctx.directory.users[user_id]
    company = ctx.directory.companies.get(user.company_id)
    admin = Admin(user.email, user.company_id, company.name if company else "")
    overview = await _overview(ctx, admin.company_id)
    return pages.page(
        f"{admin.company or 'Company'} dashboard", _render(request, ctx, admin, overview)
    )


async def _overview(ctx: Context, company_id: str) -> Overview:
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
    return Overview(
        applications=[dict(r) for r in applications],
        live_tokens={r["client_id"]: r["live_tokens"] for r in counts},
        violations=[dict(r) for r in violations],
        changes=[dict(r) | {"payload": json.loads(r["payload"])} for r in changes],
    )


def _render(request: web.Request, ctx: Context, admin: Admin, overview: Overview) -> str:
    names = {str(a["client_id"]): str(a["name"]) for a in overview.applications}

    def app_name(client_id: str) -> str:
        if client_id in names:
            return names[client_id]
        other = ctx.policy.apps.get(client_id)  # an application this company connected to
        return other.name if other else client_id

    describe = _Describer(ctx, admin.company_id, app_name)
    return "\n".join(
        [
            _STYLE,
            "<header>",
            f"<h1>{escape(admin.company or admin.company_id)}</h1>",
            f'<p class="muted">Signed in as {escape(admin.email)}</p>',
            '<form method="post" action="/dashboard/logout">',
            f'<input type="hidden" name="csrf_token" value="{escape(logout_token(request))}">',
            '<button class="secondary" type="submit">Sign out</button></form>',
            "</header>",
            _applications_table(overview),
            _violations_table(overview, app_name),
            _changes_table(overview, describe),
        ]
    )


# --- tables --------------------------------------------------------------------------


def _section(key: str, title: str, table: str) -> str:
    return (
        f'<section aria-labelledby="{key}">\n<h2 id="{key}">{escape(title)}</h2>\n'
        f'<div class="scroll">{table}</div>\n</section>'
    )


def _table(caption: str, headers: Sequence[str], rows: Iterable[str], empty: str) -> str:
    body = "\n".join(rows)
    if not body:
        return f'<p class="muted">{escape(empty)}</p>'
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in headers)
    return (
        f"<table>\n<caption>{escape(caption)}</caption>\n"
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"
    )


def _codes(values: Sequence[str]) -> str:
    if not values:
        return '<span class="muted">none</span>'
    return ", ".join(f"<code>{escape(v)}</code>" for v in values)


def _when(at: datetime) -> str:
    at = at.astimezone(UTC)
    return f'<time datetime="{escape(at.isoformat())}">{at:%Y-%m-%d %H:%M:%S} UTC</time>'


def _applications_table(overview: Overview) -> str:
    rows = (
        f'<tr><th scope="row">{escape(a["name"])}<br><code>{escape(a["client_id"])}</code></th>'
        f"<td>{escape(a['grant_type'])}</td><td>{_codes(a['ip_allowlist'])}</td>"
        f"<td>{_codes(a['permissions'])}</td>"
        f'<td class="number">{overview.live_tokens.get(a["client_id"], 0)}</td></tr>'
        for a in overview.applications
    )
    headers = ("Application", "Grant type", "IP allow list", "Permissions", "Live tokens")
    table = _table(
        "Your company's applications and their live access tokens",
        headers,
        rows,
        "No applications yet.",
    )
    return _section("applications", "Applications", table)


def _violations_table(overview: Overview, app_name: Callable[[str], str]) -> str:
    rows = (
        f"<tr><td>{_when(v['recorded_at'])}</td><td>{escape(app_name(v['client_id']))}</td>"
        f"<td><code>{escape(v['ip'])}</code></td><td>{escape(v['endpoint'])}</td>"
        f"<td>{'yes' if v['token_revoked'] else 'no'}</td></tr>"
        for v in overview.violations
    )
    headers = ("When", "Application", "IP address", "Endpoint", "Token revoked")
    table = _table(
        f"The last {RECENT} requests from outside an application's IP allow list",
        headers,
        rows,
        "No IP violations recorded.",
    )
    return _section("violations", "Recent IP violations", table)


def _changes_table(overview: Overview, describe: _Describer) -> str:
    rows = (
        f"<tr><td>{_when(c['recorded_at'])}</td><td>{escape(describe.actor(c['actor']))}"
        + (f"<br><code>{escape(c['client_ip'])}</code>" if c["client_ip"] else "")
        + f"</td><td>{escape(describe.change(c['type'], c['payload']))}</td></tr>"
        for c in overview.changes
    )
    table = _table(
        f"The last {RECENT} changes to applications, users, admin keys and connections",
        ("When", "Who", "What"),
        rows,
        "No changes recorded.",
    )
    return _section("changes", "Recent changes", table)


class _Describer:
    """Plain-language "who" and "what" for the changes table (escaped by the caller)."""

    def __init__(self, ctx: Context, company_id: str, app_name: Callable[[str], str]) -> None:
        self._ctx = ctx
        self._company_id = company_id
        self._app = app_name

    def actor(self, actor: str | None) -> str:
        kind, _, ident = (actor or "system").partition(":")
        directory = self._ctx.directory
        # Only this company's people and keys are named; anything else stays an id.
        user = directory.users.get(ident) if kind == "user" else None
        if user is not None and user.company_id == self._company_id:
            return user.email
        key = directory.admin_keys.get(ident) if kind == "admin_key" else None
        if key is not None and key.company_id == self._company_id:
            return f"admin key “{key.label}”" if key.label else "an admin key"
        if kind == "cli":
            return f"command line ({ident})"
        return actor or "system"

    def _user(self, payload: Mapping[str, Any]) -> str:
        user_id = str(payload.get("user_id"))
        user = self._ctx.directory.users.get(user_id)
        return user.email if user and user.company_id == self._company_id else user_id

    def _key(self, key_id: str) -> str:
        key = self._ctx.directory.admin_keys.get(key_id)
        if key and key.company_id == self._company_id and key.label:
            return f"“{key.label}”"
        return key_id

    def change(self, type_: str, p: Mapping[str, Any]) -> str:
        app = f"“{self._app(str(p.get('client_id', '')))}”"
        simple: dict[str, Callable[[], str]] = {
            "ApplicationCreated": lambda: (
                f"Created application “{p.get('name')}” ({p.get('grant_type')})"
            ),
            "ApplicationRenamed": lambda: f"Renamed “{p.get('before')}” to “{p.get('after')}”",
            "ClientSecretRotated": lambda: f"Rotated the client secret of {app}",
            "ApplicationDeleted": lambda: f"Deleted application {app}",
            "UserAdded": lambda: f"Added {p.get('role')} {p.get('email')}",
            "UserPasswordChanged": lambda: f"Changed the password of {self._user(p)}",
            "UserRemoved": lambda: f"Removed user {self._user(p)}",
            "AdminKeyIssued": lambda: f"Issued admin key “{p.get('label', '')}”",
            "AdminKeyRevoked": lambda: f"Revoked admin key {self._key(str(p.get('key_id')))}",
            "ConnectionGranted": lambda: f"Connected {app}: {_list(p.get('permissions'))}",
            "ConnectionRevoked": lambda: f"Revoked the connection of {app} ({p.get('reason')})",
        }
        if type_ in simple:
            return simple[type_]()
        fields = {
            "RedirectUriChanged": "redirect URI",
            "IpAllowlistChanged": "IP allow list",
            "PermissionsChanged": "permissions",
            "NotificationEmailsChanged": "notification emails",
        }
        if type_ in fields:
            before, after = _list(p.get("before")), _list(p.get("after"))
            return f"Changed the {fields[type_]} of {app}: {before} → {after}"
        if type_ == "UserRoleChanged":
            return f"Changed the role of {self._user(p)}: {p.get('before')} → {p.get('after')}"
        return type_


def _list(value: Any) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
