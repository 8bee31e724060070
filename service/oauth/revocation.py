"""Token revocation (RFC 7009): a client revokes a token of its own; anything else changes
nothing and gets the same 200. https://www.rfc-editor.org/rfc/rfc7009#section-2.1"""

from __future__ import annotations

from service.domain import grants
from service.eventlog import Metadata
from service.oauth import tokens
from service.oauth.ports import Ledger, Lookups


async def revoke(
    lookups: Lookups,
    ledger: Ledger,
    client_id: str,
    token: str,
    meta: Metadata,
    app_version: int | None = None,
) -> bool:
    """Revoke the token's family when it is a live token of `client_id`; True if it was.
    `app_version`: see grants.revoke (ConcurrencyError on the application's stream when it
    no longer holds)."""
    if tokens.well_formed(token, tokens.ACCESS):
        refresh = False
    elif tokens.well_formed(token, tokens.REFRESH):
        refresh = True
    else:
        return False
    token_hash = tokens.token_hash(token)
    family_id = await lookups.family_of(token_hash, refresh=refresh)
    owner = lookups.family_owner(family_id) if family_id is not None else None
    record = grants.revoke(client_id, family_id, owner, token_hash, app_version)
    if record is None:
        return False
    await ledger.record(record, meta, visible=True)
    return True
