"""Connections (a company's consent to an application): revoking one."""

from __future__ import annotations

from service import events as ev
from service.context import Context
from service.domain import streams
from service.errors import NotFound
from service.eventlog import Metadata


async def revoke(ctx: Context, company_id: str, client_id: str, meta: Metadata) -> None:
    """The connection goes, and every token issued through it dies with it (the read
    models revoke them on ConnectionRevoked). 404 for a connection the company does not
    have: another company's connections do not leak."""
    if (company_id, client_id) not in ctx.policy.connections:
        raise NotFound("no such connection")
    event = ev.ConnectionRevoked(company_id=company_id, client_id=client_id, reason="admin_request")
    await ctx.record(streams.connection(company_id, client_id), None, [event], meta)
