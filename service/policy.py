"""The policy decision: is this address on the application's allow list, and what
happens when a valid credential comes from one that is not."""

from __future__ import annotations

import ipaddress

from projections.memory import AppState
from service import events as ev
from service.context import Context
from service.eventlog import Metadata


def ip_allowed(app: AppState, ip: str) -> bool:
    """An empty allow list allows every address (it is optional for authorization_code)."""
    if not app.networks:
        return True
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in app.networks)


async def record_violation(
    ctx: Context, app: AppState, ip: str, endpoint: str, meta: Metadata
) -> int:
    """An IP violation where there is no token to revoke (the token endpoint)."""
    event = ev.IpViolationDetected(
        company_id=app.company_id, client_id=app.client_id, ip=ip, endpoint=endpoint
    )
    [position] = await ctx.eventlog.append(f"violations-{app.client_id}", None, [event], meta)
    return position
