"""Token introspection (RFC 7662): whether a token is active, and what it may do.
https://www.rfc-editor.org/rfc/rfc7662#section-2.2"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.domain import policy
from service.oauth import tokens
from service.oauth.ports import Lookups

#: RFC 7662 §2.2: an inactive token's answer says nothing else.
INACTIVE: dict[str, Any] = {"active": False}


class Introspection:
    def __init__(self, lookups: Lookups, clock: Callable[[], float]) -> None:
        self.lookups = lookups
        self.clock = clock

    async def introspect(self, token: str, caller_client: str | None) -> dict[str, Any]:
        """`caller_client`: the client that asks about its own token; None for a resource
        server (which may ask about any access token)."""
        if caller_client is not None and tokens.well_formed(token, tokens.REFRESH):
            return await self._refresh(token, caller_client)
        if not tokens.well_formed(token, tokens.ACCESS):
            return INACTIVE
        state = await self.lookups.access_token(tokens.token_key(token), self.clock())
        if state is None or (caller_client is not None and state.client_id != caller_client):
            return INACTIVE
        app = self.lookups.application_now(state.client_id)
        body = _active(
            policy.effective_permissions(state, app), state.client_id,
            "DPoP" if state.jkt else "Bearer", state.company_id, state.issued_at,
            state.expires_at,
        )  # fmt: skip
        if state.jkt:
            body["cnf"] = {"jkt": state.jkt}  # RFC 9449 §6.2: the key it is bound to
        return body

    async def _refresh(self, token: str, caller_client: str) -> dict[str, Any]:
        """A refresh token, for its own client only: a resource server never has one to
        check, and one that answered `active` to a refresh token could take it for an
        access token."""
        refresh_hash = tokens.token_hash(token)
        # Rare, and must be exact: a rotation a moment ago (in any process) has spent it.
        await self.lookups.catch_up()
        found = await self.lookups.refresh_family(refresh_hash)
        if found is None or found[1].client_id != caller_client:
            return INACTIVE
        family = found[1]
        if family.refresh_token_hash != refresh_hash and refresh_hash not in family.unpresented:
            return INACTIVE  # spent: using it would revoke the family
        if family.refresh_expires_at is not None and family.refresh_expires_at <= self.clock():
            return INACTIVE
        app = self.lookups.application_now(family.client_id)
        connection = self.lookups.connection(family.company_id, family.client_id)
        if app is None or connection is None:
            return INACTIVE
        granted = family.permissions & app.permissions & connection.permissions  # a refresh now
        return _active(
            granted, family.client_id, "refresh_token", family.company_id,
            family.issued_at, family.refresh_expires_at,
        )  # fmt: skip


def _active(
    scope: frozenset[str],
    client_id: str,
    token_type: str,
    company_id: str,
    iat: int,
    exp: int | None,
) -> dict[str, Any]:
    """RFC 7662 §2.2: what an active token's introspection says (`iss` is the web layer's:
    it knows the issuer)."""
    body: dict[str, Any] = {
        "active": True,
        "scope": " ".join(sorted(scope)),
        "client_id": client_id,
        "token_type": token_type,
        "sub": company_id,
        "company_id": company_id,
    }
    if iat:
        body["iat"] = iat
    if exp is not None:
        body["exp"] = exp
    return body
