"""The kill switch: every live token of an application revoked at once, its client_id and
secret kept (a leaked never-expiring client_credentials token dies without the
application being deleted and re-created under a new client_id)."""

from __future__ import annotations

import time
from collections.abc import Collection

from service import events as ev
from service.commands import applications
from service.context import Context
from service.domain import streams
from service.eventlog import ConcurrencyError, Metadata


async def revoke_tokens(
    ctx: Context,
    company_id: str,
    client_id: str,
    meta: Metadata,
    *,
    if_match: Collection[int] | None = None,
) -> int:
    """How many live grants ended (a refresh-token family counts once, as does each
    client_credentials token). One event on the application's stream, which the read
    models apply to every token recorded before it, in the log's order: whatever was issued
    before it is dead in every model and in a replay, whatever comes after is not. Token
    requests are appended on condition that the application's stream has not moved, so one
    racing with the switch is decided again after it."""
    stream = streams.application(client_id)
    for attempt in range(applications.MAX_ATTEMPTS):
        app = await applications.load(ctx, company_id, client_id)  # 404 for others'
        applications.precondition(app.version, if_match)
        await ctx.refresh()
        live = ctx.policy.live_grants(client_id, time.time())
        event = ev.ApplicationTokensRevoked(company_id=company_id, client_id=client_id)
        try:
            await ctx.record(stream, app.version, [event], meta)
        except ConcurrencyError as exc:
            if exc.stream_id != stream:
                raise
            applications.raced(if_match)
            await applications.backoff(attempt)
            continue
        return live
    raise applications.still_changing()
