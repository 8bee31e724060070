"""The dashboard's application pages: list, create (the secret shown once), edit, rotate
the secret, revoke every token, delete; client authentication (method, DPoP, token limit)
and the public keys of private_key_jwt."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from service import events as ev
from service.audit.history import COMPANY_IS
from service.commands import applications as commands
from service.commands import tokens
from service.domain import applications as rules
from service.domain import client_keys
from service.domain.applications import FieldError
from service.errors import InvalidRequest, NotFound, PreconditionFailed
from service.web.dashboard import client_auth
from service.web.dashboard.base import Admin, Form, change, page, render, routes, see_other
from service.web.dashboard.describe import app_namer
from service.web.dashboard.once import Notice
from service.web.keys import CONTEXT

RECENT_VIOLATIONS = 10


def _catalogue(request: web.Request) -> list[tuple[str, str]]:
    return sorted(request.app[CONTEXT].catalogue.items())


def _path(client_id: str) -> str:
    return f"/dashboard/applications/{client_id}"


@routes.get("/dashboard/applications")
@page
async def list_page(request: web.Request, admin: Admin) -> web.Response:
    ctx = request.app[CONTEXT]
    apps = sorted(
        (a for a in ctx.policy.apps.values() if a.company_id == admin.company_id),
        key=lambda a: (a.name.lower(), a.client_id),
    )
    counts = await _live_tokens(request, admin, None)
    return render(
        request, admin, "dashboard/applications.html", title="Applications",
        section="applications", applications=apps, live_tokens=counts,
    )  # fmt: skip


@routes.get("/dashboard/applications/new")
@page
async def new_page(request: web.Request, admin: Admin) -> web.Response:
    return _new_form(request, admin, {"grant_type": rules.AUTHORIZATION_CODE}, [])


def _new_form(
    request: web.Request, admin: Admin, values: dict[str, Any], problems: list[str]
) -> web.Response:
    return render(
        request, admin, "dashboard/application_new.html", title="New application",
        section="applications", values=values, problems=problems,
        catalogue=_catalogue(request), status=400 if problems else 200,
    )  # fmt: skip


@routes.post("/dashboard/applications")
@change
async def create(request: web.Request, admin: Admin, form: Form) -> web.Response:
    ctx = request.app[CONTEXT]
    grant_type = form.get("grant_type")
    command = rules.NewApplication(
        name=form.get("name"),
        grant_type=grant_type,
        redirect_uri=form.get("redirect_uri").strip() or None,
        ip_allowlist=form.lines("ip_allowlist"),
        permissions=form.all("permissions"),
        notification_emails=form.lines("notification_emails"),
    )
    try:
        created = await commands.create(ctx, admin.company_id, command, admin.meta(request))
    except FieldError as exc:
        values = {
            "name": command.name, "grant_type": grant_type,
            "redirect_uri": form.get("redirect_uri"), "ip_allowlist": form.get("ip_allowlist"),
            "permissions": command.permissions,
            "notification_emails": form.get("notification_emails"),
        }  # fmt: skip
        return _new_form(request, admin, values, [exc.description])
    notice = Notice(
        f"Application “{created.app.name}” created.", "Client secret", created.client_secret
    )
    return see_other(request, admin, _path(created.app.client_id), notice)


@routes.get("/dashboard/applications/{client_id}")
@page
async def detail_page(request: web.Request, admin: Admin) -> web.Response:
    ctx = request.app[CONTEXT]
    app = await commands.load(ctx, admin.company_id, request.match_info["client_id"])
    return await _detail(request, admin, app, _values(app), [])


def _values(app: rules.Application) -> dict[str, Any]:
    return {
        "name": app.name,
        "redirect_uri": app.redirect_uri or "",
        "ip_allowlist": "\n".join(app.ip_allowlist),
        "permissions": app.permissions,
        "notification_emails": "\n".join(app.notification_emails),
        "version": app.version,
    }


async def _detail(
    request: web.Request,
    admin: Admin,
    app: rules.Application,
    values: dict[str, Any],
    problems: list[str],
    status: int = 200,
    *,
    auth: dict[str, Any] | None = None,
    auth_problems: list[str] | None = None,
    key_problems: list[str] | None = None,
) -> web.Response:
    """The application page; each form's problems shown in its own section."""
    ctx = request.app[CONTEXT]
    counts = await _live_tokens(request, admin, app.client_id)
    violations = await _violations(request, admin, app.client_id)
    return render(
        request, admin, "dashboard/application.html", title=app.name, section="applications",
        app=app, values=values, problems=problems, catalogue=_catalogue(request),
        live_tokens=counts.get(app.client_id, 0), violations=violations,
        app_name=app_namer(ctx, admin.company_id), status=status,
        auth=auth or client_auth.values(app), auth_problems=auth_problems or [],
        key_problems=key_problems or [], auth_methods=client_auth.methods(app.grant_type),
        keys=await _key_rows(request, app), default_cc_token_limit=ctx.settings.cc_token_limit,
    )  # fmt: skip


@routes.post("/dashboard/applications/{client_id}")
@change
async def edit(request: web.Request, admin: Admin, form: Form) -> web.Response:
    ctx = request.app[CONTEXT]
    app = await commands.load(ctx, admin.company_id, request.match_info["client_id"])
    redirect = form.get("redirect_uri").strip()
    has_redirect = app.grant_type == rules.AUTHORIZATION_CODE
    patch = rules.Patch(
        name=form.get("name"),
        redirect_uri=(redirect or None) if has_redirect else None,
        clear_redirect_uri=has_redirect and not redirect,
        ip_allowlist=form.lines("ip_allowlist"),
        permissions=form.all("permissions"),
        notification_emails=form.lines("notification_emails"),
    )
    if_match = _seen_version(form)
    try:
        changed = await commands.update(
            ctx, admin.company_id, app.client_id, patch, admin.meta(request), if_match=if_match
        )
    except PreconditionFailed:
        latest = await commands.load(ctx, admin.company_id, app.client_id)
        message = "Someone changed this application meanwhile: here it is as it is now."
        return await _detail(request, admin, latest, _values(latest), [message], status=412)
    except FieldError as exc:
        typed = {key: form.get(key) for key in _values(app)}
        values = typed | {"permissions": form.all("permissions"), "version": app.version}
        return await _detail(request, admin, app, values, [exc.description], status=400)
    said = "Saved." if changed.version != app.version else "Nothing to change."
    return see_other(request, admin, _path(app.client_id), Notice(said))


def _seen_version(form: Form) -> frozenset[int] | None:
    """The version the form was filled in on, which the change must still find (412
    otherwise); a version the page never wrote matches none; no version: no check."""
    version = form.get("version")
    if not version:
        return None
    digits = version.isascii() and version.isdigit() and len(version) < 10  # not "³"
    return frozenset({int(version)}) if digits else frozenset()


@routes.post("/dashboard/applications/{client_id}/client-auth")
@change
async def edit_client_auth(request: web.Request, admin: Admin, form: Form) -> web.Response:
    """The authentication method, the DPoP requirement and the live-token limit, through
    the same handler and rules as the admin API's PATCH."""
    ctx = request.app[CONTEXT]
    app = await commands.load(ctx, admin.company_id, request.match_info["client_id"])
    if_match = _seen_version(form)
    try:
        patch = client_auth.patch(form)
        changed = await commands.update(
            ctx, admin.company_id, app.client_id, patch, admin.meta(request), if_match=if_match
        )
    except PreconditionFailed:
        latest = await commands.load(ctx, admin.company_id, app.client_id)
        message = "Someone changed this application meanwhile: here it is as it is now."
        return await _detail(
            request, admin, latest, _values(latest), [], status=412, auth_problems=[message]
        )
    except InvalidRequest as exc:  # a FieldError, or a method that is not one
        return await _detail(
            request, admin, app, _values(app), [], status=400,
            auth=client_auth.typed(form), auth_problems=[exc.description],
        )  # fmt: skip
    if changed.version == app.version:
        return see_other(request, admin, _path(app.client_id), Notice("Nothing to change."))
    said = "Client authentication saved."
    method = changed.token_endpoint_auth_method
    if rules.has_secret(method) and not rules.has_secret(app.token_endpoint_auth_method):
        said += " It authenticates with its client secret now: rotate the secret to get one."
    elif method == client_keys.PRIVATE_KEY_JWT and not changed.keys:
        said += " Add a public key: until then, every assertion is refused."
    return see_other(request, admin, _path(app.client_id), Notice(said))


@routes.post("/dashboard/applications/{client_id}/keys")
@change
async def add_keys(request: web.Request, admin: Admin, form: Form) -> web.Response:
    """Public keys pasted as a JWK or a JWK Set. Whatever is refused (private members,
    not JSON, a kid already registered) says why, and what was pasted is not shown again:
    it may be a private key."""
    ctx = request.app[CONTEXT]
    app = await commands.load(ctx, admin.company_id, request.match_info["client_id"])
    try:
        jwks = client_auth.pasted(form.get("jwks"))
        changed = await commands.add_keys(
            ctx, admin.company_id, app.client_id, jwks, admin.meta(request)
        )
    except InvalidRequest as exc:
        return await _detail(
            request, admin, app, _values(app), [], status=400, key_problems=[exc.description]
        )
    before = {key.kid for key in app.keys}
    added = ", ".join(f"“{key.kid}”" for key in changed.keys if key.kid not in before)
    said = f"Key(s) {added} added."
    if changed.token_endpoint_auth_method != client_keys.PRIVATE_KEY_JWT:
        said += " They sign assertions once the method is private_key_jwt."
    return see_other(request, admin, _path(app.client_id), Notice(said))


def _registered(app: rules.Application, kid: str) -> client_keys.ClientKey:
    for key in app.keys:
        if key.kid == kid:
            return key
    raise NotFound("no such key")


# The kid travels in the query and in a form field, never in the path: a kid may hold "/".
@routes.get("/dashboard/applications/{client_id}/keys/remove")
@page
async def remove_key_page(request: web.Request, admin: Admin) -> web.Response:
    ctx = request.app[CONTEXT]
    app = await commands.load(ctx, admin.company_id, request.match_info["client_id"])
    key = _registered(app, request.query.get("kid", ""))
    return render(
        request, admin, "dashboard/application_key_remove.html", title=f"Remove key {key.kid}",
        section="applications", app=app, key=key,
    )  # fmt: skip


@routes.post("/dashboard/applications/{client_id}/keys/remove")
@change
async def remove_key(request: web.Request, admin: Admin, form: Form) -> web.Response:
    ctx = request.app[CONTEXT]
    client_id = request.match_info["client_id"]
    kid = form.get("kid")
    await commands.remove_key(ctx, admin.company_id, client_id, kid, admin.meta(request))
    notice = Notice(f"Key “{kid}” removed: assertions signed with it are refused from now on.")
    return see_other(request, admin, _path(client_id), notice)


@routes.post("/dashboard/applications/{client_id}/rotate-secret")
@change
async def rotate(request: web.Request, admin: Admin, form: Form) -> web.Response:
    ctx = request.app[CONTEXT]
    client_id = request.match_info["client_id"]
    app, secret = await commands.rotate_secret(
        ctx, admin.company_id, client_id, admin.meta(request)
    )
    message = (
        "New client secret: the old one is refused from now on; tokens issued with it "
        "stay valid until they expire."
    )
    return see_other(request, admin, _path(app.client_id), Notice(message, "Client secret", secret))


@routes.post("/dashboard/applications/{client_id}/revoke-tokens")
@change
async def revoke_tokens(request: web.Request, admin: Admin, form: Form) -> web.Response:
    ctx = request.app[CONTEXT]
    app = await commands.load(ctx, admin.company_id, request.match_info["client_id"])
    ended = await tokens.revoke_tokens(ctx, admin.company_id, app.client_id, admin.meta(request))
    notice = Notice(f"{ended} live grant(s) of “{app.name}” revoked, for every company.")
    return see_other(request, admin, _path(app.client_id), notice)


@routes.get("/dashboard/applications/{client_id}/delete")
@page
async def delete_page(request: web.Request, admin: Admin) -> web.Response:
    ctx = request.app[CONTEXT]
    app = await commands.load(ctx, admin.company_id, request.match_info["client_id"])
    return render(
        request, admin, "dashboard/application_delete.html", title=f"Delete {app.name}",
        section="applications", app=app,
    )  # fmt: skip


@routes.post("/dashboard/applications/{client_id}/delete")
@change
async def delete(request: web.Request, admin: Admin, form: Form) -> web.Response:
    ctx = request.app[CONTEXT]
    app = await commands.load(ctx, admin.company_id, request.match_info["client_id"])
    await commands.delete(ctx, admin.company_id, app.client_id, admin.meta(request))
    notice = Notice(f"Application “{app.name}” deleted; its tokens and connections are revoked.")
    return see_other(request, admin, "/dashboard/applications", notice)


# --- read models ---------------------------------------------------------------------


async def _key_rows(request: web.Request, app: rules.Application) -> list[client_auth.KeyRow]:
    """The registered keys, each with when it was added (its ClientKeyAdded)."""
    if not app.keys:
        return []
    history = await request.app[CONTEXT].eventlog.read_stream(commands.stream(app.client_id))
    added: dict[str, datetime] = {
        r.event.kid: r.recorded_at for r in history if isinstance(r.event, ev.ClientKeyAdded)
    }
    return [client_auth.row(key, added.get(key.kid)) for key in app.keys]


async def _live_tokens(request: web.Request, admin: Admin, client_id: str | None) -> dict[str, int]:
    pool = request.app[CONTEXT].pool
    rows = await pool.fetch(
        "SELECT client_id, live_tokens FROM v_live_tokens_per_application "
        "WHERE company_id = $1 AND ($2::text IS NULL OR client_id = $2)",
        admin.company_id,
        client_id,
    )
    return {r["client_id"]: int(r["live_tokens"]) for r in rows}


async def _violations(request: web.Request, admin: Admin, client_id: str) -> list[dict[str, Any]]:
    pool = request.app[CONTEXT].pool
    rows = await pool.fetch(
        "SELECT recorded_at, client_id, ip, endpoint, token_revoked FROM v_ip_violations "
        f"WHERE {COMPANY_IS.format(n=1)} AND client_id = $2 "
        "ORDER BY company_id DESC, position DESC LIMIT $3",
        admin.company_id,
        client_id,
        RECENT_VIOLATIONS,
    )
    return [dict(r) for r in rows]
