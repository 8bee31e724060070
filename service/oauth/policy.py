"""The policy decision point for requests that carry an access token (the gateway and
/policy/check): look the token up, let the rules decide, record a violation's revocation.
https://www.rfc-editor.org/rfc/rfc6750#section-3.1"""

from __future__ import annotations

from collections.abc import Callable

from service.domain import policy, streams
from service.domain.policy import Allowed
from service.eventlog import ConcurrencyError, Metadata
from service.oauth import tokens
from service.oauth.errors import InvalidToken
from service.oauth.ports import Ledger, Lookups

__all__ = ["Allowed", "PolicyPoint"]


class PolicyPoint:
    def __init__(self, lookups: Lookups, ledger: Ledger, clock: Callable[[], float]) -> None:
        self.lookups = lookups
        self.ledger = ledger
        self.clock = clock

    async def decide(
        self, raw: str, ip: str, permission: str | None, endpoint: str, meta: Metadata
    ) -> Allowed:
        """Allowed, or an OAuthError: 401 invalid_token, 403 insufficient_scope, or 403
        ip_not_allowed once the token's family is revoked. Malformed tokens never reach a
        lookup."""
        if not tokens.well_formed(raw, tokens.ACCESS):
            raise InvalidToken("malformed access token")
        key = bytes.fromhex(tokens.token_hash(raw))
        token = await self.lookups.access_token(key, self.clock())
        app = self.lookups.application_now(token.client_id) if token is not None else None
        error = None
        for _attempt in range(3):
            family = None if token is None else streams.family_of(key, token.family_id)
            version = None if family is None else self.lookups.family_version(family)
            decision = policy.decide(key, token, app, version, ip, permission, endpoint)
            if isinstance(decision, Allowed):
                return decision
            error = decision.error
            if decision.record is None:
                raise error  # revoked meanwhile, here or elsewhere
            try:
                # Visible at once: the next request here must find the token revoked.
                await self.ledger.record(decision.record, meta, visible=True)
            except ConcurrencyError:
                await self.lookups.catch_up()  # a concurrent request revoked it first
                continue
            raise error
        assert error is not None
        raise error
