"""GET /admin/events: the caller company's own event history, page by page."""

from __future__ import annotations

from aiohttp import web

from service.audit import history
from service.errors import InvalidRequest
from service.web import auth
from service.web.keys import CONTEXT

routes = web.RouteTableDef()

_PARAMETERS = ("after", "limit", "type", "stream")


@routes.get("/admin/events")
async def list_events(request: web.Request) -> web.Response:
    """`?after=<position>&limit=<n>&type=<EventType>&stream=<stream_id>`; the answer's
    `next_after` is the `after` of the next page (null once a page comes back empty)."""
    ctx = request.app[CONTEXT]
    who = await auth.admin(request, ctx)
    params: dict[str, str | None] = {}
    for name in _PARAMETERS:
        values = request.query.getall(name, [])
        if len(values) > 1:
            raise InvalidRequest(f"{name}: given more than once")
        params[name] = values[0] if values else None
    try:
        query = history.parse(params, who.company_id)
    except history.HistoryError as exc:
        raise InvalidRequest(str(exc)) from None
    items = await history.read(ctx.pool, query)
    await history.seen_by(ctx.pool, ctx.directory, who.company_id, items)
    return web.json_response(
        {"events": items, "next_after": history.next_after(items)},
        headers={"Cache-Control": "no-store"},
    )
