"""The token endpoint's protocol core (RFC 6749 §3.2): authenticate the client, hold it to
its allow list, dispatch to its grant, record what the grant decides, answer. It knows
nothing of the web framework: parameters in, a token response (or an OAuthError) out.
https://www.rfc-editor.org/rfc/rfc6749#section-3.2"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

import structlog

from service.domain import dpop, grants, native_apps
from service.domain.state import AppState
from service.eventlog import ConcurrencyError, EventLogError, Metadata
from service.logs import error_text
from service.oauth import dpop as proofs
from service.oauth import tokens
from service.oauth.cc_bounds import ClientTokenBounds, LiveTokens
from service.oauth.clients import (
    Assertion,
    AssertionCheck,
    Spend,
    allowed_or_refused,
    authenticate,
    client_credentials,
    client_metadata,
)
from service.oauth.errors import (
    InvalidGrant,
    InvalidRequest,
    TemporarilyUnavailable,
    UnsupportedGrantType,
)
from service.oauth.ports import Ledger, Lookups
from service.settings import Settings

Clock = Callable[[], float]
log = structlog.get_logger(__name__)
#: what a client that authenticates otherwise than by assertion is checked with (nothing)
_NO_ASSERTION = AssertionCheck()


@dataclass(frozen=True)
class Limits:
    """The token endpoint's bounds (Settings: REFRESH_REUSE_GRACE, CC_TOKEN_LIMIT,
    TOKEN_RATE_PER_CLIENT, TOKEN_RATE_BURST); 0 turns one off."""

    refresh_grace: int = 10
    cc_token_limit: int = 1000
    rate: int = 20
    burst: int = 100

    def live_tokens_of(self, app: AppState) -> int:
        """The application's own bound of live client_credentials tokens, else the
        setting's (0: none)."""
        return self.cc_token_limit if app.cc_token_limit is None else app.cc_token_limit

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(
            settings.refresh_reuse_grace,
            settings.cc_token_limit,
            settings.token_rate_per_client,
            settings.token_rate_burst,
        )


class ApplicationChanged(Exception):
    """The application or the connection changed while a token was being issued (a
    secret rotation, a revoked connection): authenticate again against the new state."""


@dataclass(frozen=True)
class Issued:
    access_token: str
    scope: list[str]
    refresh_token: str | None = None
    expires_in: int | None = None
    token_type: str = "Bearer"  # noqa: S105  ("DPoP": bound to the proof's key)

    def body(self) -> dict[str, Any]:
        """RFC 6749 §5.1; RFC 9449 §5.1 (token_type DPoP)."""
        body: dict[str, Any] = {"access_token": self.access_token, "token_type": self.token_type}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        if self.refresh_token is not None:
            body["refresh_token"] = self.refresh_token
        body["scope"] = " ".join(self.scope)
        return body


@dataclass(frozen=True)
class Request:
    """One token request, as the grants see it."""

    app: AppState
    params: Mapping[str, str]
    meta: Metadata
    now: int
    jkt: str = ""  # the key of the request's valid DPoP proof; "": none
    #: single uses to record once the grant is decided (an assertion's, a DPoP proof's)
    later: list[Spend] = field(default_factory=list)
    #: the tokens its decisions supersede, reserved from other requests' until recorded
    superseding: list[bytes] = field(default_factory=list)

    @property
    def ip(self) -> str:
        return self.meta.client_ip or ""


class Grant:
    """A grant type of the token endpoint: its name, the parameters it requires, and how it
    decides. The endpoint dispatches on `grant_type` without knowing any of them."""

    grant_type: ClassVar[str]
    required: ClassVar[tuple[str, ...]] = ()
    issues_refresh: ClassVar[bool] = False

    def __init__(self, lookups: Lookups, limits: Limits, bounds: ClientTokenBounds) -> None:
        self.lookups = lookups
        self.limits = limits
        self.bounds = bounds

    async def decide(
        self, request: Request, access_hash: str, refresh_hash: str
    ) -> grants.Issue | grants.Refusal:
        raise NotImplementedError


class ClientCredentials(Grant):
    """RFC 6749 §4.4."""

    grant_type = "client_credentials"

    async def decide(
        self, request: Request, access_hash: str, refresh_hash: str
    ) -> grants.Issue | grants.Refusal:
        scope = request.params.get("scope")
        app = request.app
        superseded = self.bounds.to_supersede(app, request.superseding)
        return grants.client_credentials(
            app, scope, access_hash, request.now, superseded, request.jkt
        )


class AuthorizationCode(Grant):
    """RFC 6749 §4.1.3 with PKCE (RFC 7636 §4.5)."""

    grant_type = "authorization_code"
    # redirect_uri only if the authorization request named it (RFC 6749 §4.1.3): the code
    # knows, so `grants.redeem_code` asks for it
    required = ("code",)
    issues_refresh = True

    async def decide(
        self, request: Request, access_hash: str, refresh_hash: str
    ) -> grants.Issue | grants.Refusal:
        code = request.params["code"]
        if not tokens.well_formed(code, tokens.CODE):
            raise InvalidGrant("unknown, expired or spent authorization code")
        code_hash = tokens.token_hash(code)
        state = await self.lookups.code(code_hash)
        if state is not None and state.client_id == request.app.client_id:
            # Only for the client's own code: another's is unknown to it (redeem_code), and
            # a different answer would tell that the code exists.
            native_apps.require_pkce(request.app, state)
        connection = (
            self.lookups.connection(state.company_id, request.app.client_id) if state else None
        )
        return grants.redeem_code(
            request.app,
            code_hash,
            state,
            request.params.get("redirect_uri") or None,  # empty: omitted (RFC 6749 §3.1)
            request.params.get("code_verifier"),
            connection,
            (access_hash, refresh_hash),
            request.now,
            request.ip,
            request.jkt,
        )


class RefreshToken(Grant):
    """RFC 6749 §6, rotation with reuse detection (RFC 9700 §4.14.2)."""

    grant_type = "refresh_token"
    required = ("refresh_token",)
    issues_refresh = True

    async def decide(
        self, request: Request, access_hash: str, refresh_hash: str
    ) -> grants.Issue | grants.Refusal:
        presented = request.params["refresh_token"]
        if not tokens.well_formed(presented, tokens.REFRESH):
            raise InvalidGrant("unknown, expired or revoked refresh token")
        presented_hash = tokens.token_hash(presented)
        found = await self.lookups.refresh_family(presented_hash)
        connection = (
            self.lookups.connection(found[1].company_id, request.app.client_id) if found else None
        )
        return grants.refresh(
            request.app,
            presented_hash,
            found,
            connection,
            request.params.get("scope"),
            (access_hash, refresh_hash),
            request.now,
            request.ip,
            self.limits.refresh_grace,
            request.jkt,
        )


GRANT_TYPES: tuple[type[Grant], ...] = (ClientCredentials, AuthorizationCode, RefreshToken)


class TokenEndpoint:
    def __init__(
        self,
        lookups: Lookups,
        ledger: Ledger,
        clock: Clock,
        *,
        attempts: int = 3,
        limits: Limits | None = None,
        live_tokens: LiveTokens | None = None,
        audiences: Sequence[str] = (),
    ) -> None:
        """`live_tokens`: without it, client_credentials tokens are not limited in number,
        and their rate is this endpoint's alone (the model tells of other processes' tokens).
        `audiences`: what a client assertion's aud may name (assertions.audiences); none:
        every assertion is refused."""
        self.lookups = lookups
        self.ledger = ledger
        self.clock = clock
        self.attempts = attempts
        self.audiences = tuple(audiences)
        self.limits = limits if limits is not None else Limits()
        self.bounds = ClientTokenBounds(self.limits, lookups, ledger, clock, live_tokens)
        self.grants = {g.grant_type: g(lookups, self.limits, self.bounds) for g in GRANT_TYPES}

    @property
    def grant_types(self) -> list[str]:
        return list(self.grants)

    async def token(
        self,
        params: Mapping[str, str],
        authorization: str | None,
        meta: Metadata,
        presented: proofs.Presented | None = None,
    ) -> Issued:
        """`authorization`: the request's Authorization header (HTTP Basic client
        credentials, or none when they are in `params`); `presented`: the request's DPoP
        proof (RFC 9449 §5), if it carried one."""
        grant_type = params.get("grant_type")
        if not grant_type:
            raise InvalidRequest("grant_type is required")
        grant = self.grants.get(grant_type)
        if grant is None:
            raise UnsupportedGrantType(f"supported: {', '.join(self.grants)}")
        client = client_credentials(authorization, params)
        meta = client_metadata(meta, client)
        jkt = ""
        # The single uses of the request's assertion and DPoP proof, recorded once the grant
        # is decided (`_recorded`): a request refused before (a made-up code, a scope too
        # wide) records nothing, where anyone who knew a public client's id could fill the
        # log with them.
        later: list[Spend] = []
        for attempt in range(self.attempts):
            # An assertion's single use is recorded once: a retry after the application
            # changed checks it again against the new keys, but it is the same request.
            check = _NO_ASSERTION  # a client secret: nothing of this is looked at
            if isinstance(client, Assertion):
                check = AssertionCheck(
                    self.audiences, self.clock(), record_use=attempt == 0, later=later
                )
            app = await authenticate(self.lookups, self.ledger, client, meta, check)
            await self.allowed_or_refused(app, meta, "token")
            grants.check_grant_type(app, grant_type)
            for name in grant.required:
                if not params.get(name):  # an empty parameter is an omitted one (§3.1)
                    raise InvalidRequest(f"{name} is required")
            if attempt == 0:
                if grant.grant_type == ClientCredentials.grant_type:
                    # They never expire: a client that asks for one per call is held to a
                    # rate. Users' grants are not (an application's users refresh at once).
                    self.bounds.within_rate(app.client_id)
                jkt = await self.proof_key(app, presented, meta, later)
            if app.dpop_bound and not jkt:  # RFC 9449 §5.2, also when it was just set
                raise dpop.InvalidDpopProof("this client's token requests need a DPoP proof")
            try:
                request = Request(app, params, meta, int(self.clock()), jkt, later)
                return await self._issue(grant, request)
            except ApplicationChanged:
                await self.lookups.catch_up()  # a rotation committed first: look again
        raise TemporarilyUnavailable("the application keeps changing; try again")

    async def allowed_or_refused(self, app: AppState, meta: Metadata, endpoint: str) -> None:
        """SPEC §2: a correct client authentication from a disallowed address gets 403 and
        raises the same notification as a token used from there."""
        await allowed_or_refused(self.ledger, app, meta, endpoint)

    async def proof_key(
        self,
        app: AppState,
        presented: proofs.Presented | None,
        meta: Metadata,
        later: list[Spend] | None = None,
    ) -> str:
        """The thumbprint of the key a valid DPoP proof proves, its single use recorded (or
        put in `later`, to record with the grant); "" without a proof. Checked once per
        request: a retry after the application changed is the same request with the same
        proof."""
        if presented is None:  # an empty DPoP header is a malformed proof (RFC 9449 §4.3)
            return ""
        proof = dpop.verify(presented.proof, presented.htm, presented.htu, self.clock())
        refused = await proofs.nonce_refusal(presented, proof, self.clock())
        if refused is not None:  # DPOP_NONCE=required: before its jti is spent (RFC 9449 §8)
            raise refused
        spend = functools.partial(
            proofs.record_use, self.ledger, proof, app.company_id, app.client_id, "token", meta
        )
        if later is not None:
            later.append(spend)
        else:
            await spend()
        return proof.jkt

    async def _issue(self, grant: Grant, request: Request) -> Issued:
        access = tokens.new(tokens.ACCESS)
        refresh = tokens.new(tokens.REFRESH) if grant.issues_refresh else ""
        # Hashed once here: what the grants record, and what the bounds count
        access_hash = tokens.token_hash(access)
        refresh_hash = tokens.token_hash(refresh) if refresh else ""
        client_id = request.app.client_id
        if grant.grant_type == ClientCredentials.grant_type:
            self.bounds.granting(request.app, access_hash)
        try:
            try:
                decision = await self._recorded(grant, request, access_hash, refresh_hash)
            except BaseException:
                self.bounds.not_granted(access_hash)
                raise
            try:
                for then in decision.then:
                    # Visible: once the answer is sent, a superseded token is refused here.
                    await self.ledger.record(then, request.meta, visible=True)
            except EventLogError as exc:
                # The token is recorded: answer with it. What was not superseded now is
                # when its token is counted again once applied, or at the next issuance.
                log.warning("token.supersede_failed", client_id=client_id, error=error_text(exc))
        finally:
            self.bounds.release(client_id, request.superseding)
        return Issued(
            access,
            decision.scope,
            refresh if decision.refresh else None,
            decision.expires_in,
            "DPoP" if request.jkt else "Bearer",
        )

    async def _recorded(
        self, grant: Grant, request: Request, access_hash: str, refresh_hash: str
    ) -> grants.Issue:
        """Decide and record; a race lost on the token's own stream (the same code or
        refresh token spent by another request a moment before) is decided again on what
        the winner recorded: a reuse, or a repeat within the refresh grace."""
        lost_at: int | None = None  # the version the last decision lost the race at
        unseen = 0  # races lost again at that version: the winner not in sight
        conflict: grants.Refusal | None = None
        # Each race lost to a winner in sight moves the stream on, and a refresh token's
        # repeats end within GRACE_REPEATS: past that many races, a flood.
        for _ in range(self.attempts + grants.GRACE_REPEATS):
            decision = await grant.decide(request, access_hash, refresh_hash)
            # Decided: what the request used once is spent now, before anything is recorded
            # of the decision. A grant's reuse detection (a code or a refresh token presented
            # again) revokes the grant: a replay of a whole request, its assertion or proof
            # spent, must stop here and not act on it.
            while request.later:
                await request.later.pop(0)()
            if isinstance(decision, grants.Refusal):
                await self._refuse(decision, request.meta)
            version = decision.record.expected_version
            if version is not None and version == lost_at:
                unseen += 1
            try:
                await self.ledger.record(decision.record, request.meta)
                return decision
            except ConcurrencyError as exc:
                if exc.stream_id in decision.condition_streams:
                    raise ApplicationChanged() from None
                conflict = decision.conflict
                if conflict is None:
                    raise
                if unseen >= self.attempts - 1:  # the winner cannot be seen: a reuse
                    await self._refuse(conflict, request.meta)
                lost_at = version
                await self.lookups.catch_up()
        assert conflict is not None  # every race lost on the token's own stream
        await self._refuse(conflict, request.meta)

    async def _refuse(self, refusal: grants.Refusal, meta: Metadata) -> NoReturn:
        # Visible at once: the next request here must find the family revoked.
        await self.ledger.record(refusal.record, meta, visible=True)
        raise refusal.error
