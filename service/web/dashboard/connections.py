"""The seed's Connections page: the applications connected to this company (by whom, with
which permissions; revoke one), and the companies that connected this company's own."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from service.commands import connections as commands
from service.context import Context
from service.web.dashboard.base import Admin, Form, change, page, render, routes, see_other
from service.web.dashboard.once import Notice
from service.web.keys import CONTEXT


@dataclass(frozen=True)
class Row:
    client_id: str
    application: str
    company: str  # the application's publisher, or the company that connected it
    granted_by: str
    permissions: list[str]


@routes.get("/dashboard/connections")
@page
async def connections_page(request: web.Request, admin: Admin) -> web.Response:
    ctx = request.app[CONTEXT]
    connected, published = _rows(ctx, admin.company_id)
    return render(
        request, admin, "dashboard/connections.html", title="Connections",
        section="connections", connected=connected, published=published,
    )  # fmt: skip


def _rows(ctx: Context, company_id: str) -> tuple[list[Row], list[Row]]:
    companies, users = ctx.directory.companies, ctx.directory.users
    connected: list[Row] = []
    published: list[Row] = []
    for (company, client_id), connection in ctx.policy.connections.items():
        app = ctx.policy.apps.get(client_id)
        if app is None or company_id not in (company, app.company_id):
            continue
        permissions = sorted(connection.permissions)
        if company == company_id:
            user = users.get(connection.user_id)
            who = user.email if user and user.company_id == company_id else connection.user_id
            owner = companies.get(app.company_id)
            name = owner.name if owner else app.company_id
            connected.append(Row(client_id, app.name, name, who, permissions))
        if app.company_id == company_id:
            other = companies.get(company)
            name = other.name if other else company
            # Who at the other company consented is theirs to know, not the publisher's.
            published.append(Row(client_id, app.name, name, "", permissions))
    connected.sort(key=lambda r: (r.application.lower(), r.client_id))
    published.sort(key=lambda r: (r.application.lower(), r.company.lower()))
    return connected, published


@routes.post("/dashboard/connections/{client_id}/revoke")
@change
async def revoke(request: web.Request, admin: Admin, form: Form) -> web.Response:
    ctx = request.app[CONTEXT]
    client_id = request.match_info["client_id"]
    app = ctx.policy.apps.get(client_id)
    await commands.revoke(ctx, admin.company_id, client_id, admin.meta(request))
    name = app.name if app else client_id
    notice = Notice(f"Connection to “{name}” revoked; its tokens no longer work.")
    return see_other(request, admin, "/dashboard/connections", notice)
