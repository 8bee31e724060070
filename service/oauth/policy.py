"""The policy decision point for requests that carry an access token (the gateway and
/policy/check): look the token up, let the rules decide, record a violation's revocation.
https://www.rfc-editor.org/rfc/rfc6750#section-3.1"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from service.domain import dpop, policy, streams
from service.domain.policy import Allowed
from service.domain.state import TokenState
from service.eventlog import ConcurrencyError, Metadata
from service.oauth import tokens
from service.oauth.dpop import Presented, nonce_refusal, record_use
from service.oauth.errors import InvalidToken, OAuthError
from service.oauth.ports import Ledger, Lookups

__all__ = ["Allowed", "PolicyPoint"]


class PolicyPoint:
    def __init__(self, lookups: Lookups, ledger: Ledger, clock: Callable[[], float]) -> None:
        self.lookups = lookups
        self.ledger = ledger
        self.clock = clock

    async def decide(
        self,
        raw: str,
        ip: str,
        permission: str | None,
        endpoint: str,
        meta: Metadata,
        presented: Presented | None = None,
    ) -> Allowed:
        """Allowed, or an OAuthError: 401 invalid_token, 403 insufficient_scope, or 403
        ip_not_allowed once the token's family is revoked. Malformed tokens never cost a
        read. `presented`: the request came as a DPoP one (RFC 9449 §7.1), with its proof
        ("" when the header was missing); None: a Bearer request."""
        try:
            return await self._decide(raw, ip, permission, endpoint, meta, presented)
        except InvalidToken as exc:
            if presented is None:
                raise
            # Asked with the DPoP scheme: the challenge a DPoP client reads (RFC 9449 §7.1)
            raise dpop.DpopTokenRefused(exc.description) from None

    async def _decide(
        self,
        raw: str,
        ip: str,
        permission: str | None,
        endpoint: str,
        meta: Metadata,
        presented: Presented | None,
    ) -> Allowed:
        key = tokens.token_key(raw)
        # A live token found in memory is well formed (it was issued here); only a miss is
        # checked before the read that catching up with the log costs.
        token = self.lookups.access_token_now(key, self.clock())
        if token is None:
            if not tokens.well_formed(raw, tokens.ACCESS):
                raise InvalidToken("malformed access token")
            token = await self.lookups.access_token(key, self.clock())
        app = self.lookups.application_now(token.client_id) if token is not None else None
        proof: dpop.Proof | None = None
        binding: OAuthError | None = None
        if token is not None and (token.jkt or presented is not None):
            proof, binding = self._binding(raw, token, presented)
            if binding is None and proof is not None and presented is not None:
                # DPOP_NONCE=required (RFC 9449 §9): decided, like the binding, after the allow list
                now = self.clock()
                binding = await nonce_refusal(presented, proof, now, dpop.DpopNonceRequired)
        error = None
        for attempt in range(3):
            if attempt:  # decided again on what the log now holds
                token = self.lookups.access_token_now(key, self.clock())
                if token is None and error is not None:
                    raise error  # revoked meanwhile, here or elsewhere
                app = self.lookups.application_now(token.client_id) if token else None
            decision = policy.decide(
                key, token, app, partial(self._family_version, key, token), ip, permission,
                endpoint, binding,
            )  # fmt: skip
            if isinstance(decision, Allowed):
                if proof is not None:
                    await record_use(
                        self.ledger, proof, decision.token.company_id, decision.token.client_id,
                        endpoint, meta, dpop.DpopProofRefused,
                    )  # fmt: skip
                return decision
            error = decision.error
            if decision.record is None:
                raise error  # revoked meanwhile, here or elsewhere
            try:
                # Visible at once: the next request here must find the token revoked.
                await self.ledger.record(decision.record, meta, visible=True)
            except ConcurrencyError:
                # A concurrent request revoked it first, or the application changed
                await self.lookups.catch_up()
                continue
            raise error
        assert error is not None
        raise error

    def allowed_now(
        self, raw: str, ip: str, permission: str | None, endpoint: str, bearer: bool
    ) -> Allowed | None:
        """The common case decided at once, without a wait: a Bearer request (`bearer`)
        with a token this process holds, not bound to a key, from an allowed address.
        Refusals that record nothing (a missing permission) are raised as `decide` raises
        them; None: `decide` must decide (a token not found here, DPoP, a violation)."""
        if not bearer:
            return None
        key = tokens.token_key(raw)
        token = self.lookups.access_token_now(key, self.clock())
        if token is None or token.jkt:
            return None
        app = self.lookups.application_now(token.client_id)
        decision = policy.decide(
            key, token, app, partial(self._family_version, key, token), ip, permission, endpoint
        )
        return decision if isinstance(decision, Allowed) else None

    def _family_version(self, key: bytes, token: TokenState | None) -> int | None:
        family = None if token is None else streams.family_of(key, token.family_id)
        return None if family is None else self.lookups.family_version(family)

    def _binding(
        self, raw: str, token: TokenState, presented: Presented | None
    ) -> tuple[dpop.Proof | None, OAuthError | None]:
        """The request's valid proof, and why the request does not fit the token's DPoP
        binding, if it does not (RFC 9449 §7.1): only a bound token, or a request that
        says it is a DPoP one, gets its proof parsed."""
        proof = None
        if presented is not None and presented.proof:
            try:
                proof = dpop.verify(
                    presented.proof, presented.htm, presented.htu, self.clock(),
                    access_token=raw, error=dpop.DpopProofRefused,
                )  # fmt: skip
            except dpop.DpopProofRefused as refused:
                return None, refused
        jkt = None if proof is None else proof.jkt
        return proof, dpop.binding_error(token.jkt, jkt, presented is not None)
