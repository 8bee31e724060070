"""The dashboard's History page: the company's events, newest first, filtered by type,
application and time, a page at a time, with the values before and after each change."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from service import events as ev
from service.audit import history
from service.context import Context
from service.eventlog import to_recorded
from service.web.dashboard.base import Admin, page, render, routes
from service.web.dashboard.describe import Describer, app_namer
from service.web.keys import CONTEXT

PAGE = 25
CHANGES = "changes"  # the default filter: what people changed
EVERYTHING = "all"
_COLUMNS = (
    "position, stream_id, version, type, schema_version, company_id, payload, metadata, "
    "recorded_at, hash"
)


@dataclass(frozen=True)
class Filters:
    type: str = CHANGES
    application: str = ""
    since: datetime | None = None
    until: datetime | None = None
    before: int = history.MAX_POSITION

    def query(self, **override: Any) -> str:
        values = {
            "type": self.type, "application": self.application,
            "since": _local(self.since), "until": _local(self.until),
        } | override  # fmt: skip
        return urlencode({k: v for k, v in values.items() if v})


def _local(at: datetime | None) -> str:
    return "" if at is None else at.strftime("%Y-%m-%dT%H:%M")


def _utc(at: datetime) -> datetime:
    """A time as the form gives it, in UTC (its fields are UTC); one with an offset
    (typed into the address) converted, not relabelled."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _parse(params: Any, applications: dict[str, str]) -> tuple[Filters, list[str]]:
    """The filters that make sense; each one that does not is named and left out."""
    problems: list[str] = []
    type_ = params.get("type", CHANGES)
    if type_ not in (CHANGES, EVERYTHING) and type_ not in ev.BY_TAG:
        problems.append("Event type: unknown; showing every change.")
        type_ = CHANGES
    application = params.get("application", "")
    if application and application not in applications:
        problems.append("Application: not one of yours; showing every application.")
        application = ""
    when: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        try:
            given = params.get(name, "")
            when[name] = _utc(datetime.fromisoformat(given)) if given else None
        except (ValueError, OverflowError):  # at year 1 or 9999, an offset leaves the calendar
            problems.append(f"{name.capitalize()}: not a date and time; left out.")
            when[name] = None
    before = params.get("before", "")
    cursor = int(before) if before.isdigit() and len(before) <= 18 else history.MAX_POSITION
    return Filters(type_, application, when["since"], when["until"], cursor), problems


async def _page(ctx: Context, company_id: str, filters: Filters) -> list[dict[str, Any]]:
    """Newest first down the (company_id, position) index (see history.COMPANY_IS)."""
    clauses = [history.COMPANY_IS.format(n=1), "position < $2"]
    args: list[Any] = [company_id, filters.before, PAGE + 1]
    types = {CHANGES: list(history.CHANGE_TYPES), EVERYTHING: None}.get(
        filters.type, [filters.type]
    )
    for clause, value in (
        ("type = ANY(${n}::text[])", types),
        ("payload ->> 'client_id' = ${n}", filters.application or None),
        ("recorded_at >= ${n}", filters.since),
        ("recorded_at < ${n}", filters.until),
    ):
        if value is not None:
            args.append(value)
            clauses.append(clause.format(n=len(args)))
    rows = await ctx.pool.fetch(
        f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(clauses)} "
        "ORDER BY company_id DESC, position DESC LIMIT $3",
        *args,
    )
    items = [history.item(to_recorded(row, readable_only=False)) for row in rows]
    return await history.seen_by(ctx.pool, ctx.directory, company_id, items)


@routes.get("/dashboard/history")
@page
async def history_page(request: web.Request, admin: Admin) -> web.Response:
    ctx = request.app[CONTEXT]
    app_name = app_namer(ctx, admin.company_id)
    applications = {
        client_id: app_name(client_id)
        for client_id, app in ctx.policy.apps.items()
        if app.company_id == admin.company_id
        or (admin.company_id, client_id) in ctx.policy.connections
    }
    filters, problems = _parse(request.query, applications)
    items = await _page(ctx, admin.company_id, filters)
    older = items[PAGE - 1]["position"] if len(items) > PAGE else None
    return render(
        request, admin, "dashboard/history.html", title="History", section="history",
        items=items[:PAGE], filters=filters, problems=problems, older=older,
        applications=sorted(applications.items(), key=lambda a: a[1].lower()),
        types=sorted(ev.BY_TAG), describe=Describer(ctx, admin.company_id, app_name),
        status=400 if problems else 200, recorded=_recorded, shown=_shown,
    )  # fmt: skip


def _recorded(item: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(item["recorded_at"])


def _shown(value: Any) -> str:
    """A payload's before or after value, as text."""
    if value is None or value == []:
        return "none"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
