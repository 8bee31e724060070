"""The grants of the token endpoint: client_credentials, authorization_code (with PKCE)
and refresh_token (rotation with reuse detection). Each returns what to answer; every
token is committed to the log before that answer exists."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Any

from projections.memory import AppState, lone_family
from service import events as ev
from service.context import Context
from service.domain.applications import AUTHORIZATION_CODE, CLIENT_CREDENTIALS
from service.eventlog import ConcurrencyError, Metadata
from service.oauth import tokens
from service.oauth.errors import InvalidGrant, InvalidRequest, InvalidScope, UnauthorizedClient

ACCESS_TOKEN_TTL = 2 * 3600  # authorization_code access tokens (the seed: 2 hours)
REFRESH_TOKEN_TTL = 30 * 86400
CODE_TTL = 600  # at most 10 minutes (RFC 6749 §4.1.2)
MAX_SCOPE = 2000
VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")  # RFC 7636 §4.1


class ApplicationChanged(Exception):
    """The application or the connection changed while a token was being issued (a
    secret rotation, a revoked connection): authenticate again against the new state."""


@dataclass(frozen=True)
class Issued:
    access_token: str
    scope: list[str]
    refresh_token: str | None = None
    expires_in: int | None = None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"access_token": self.access_token, "token_type": "Bearer"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        if self.refresh_token is not None:
            body["refresh_token"] = self.refresh_token
        body["scope"] = " ".join(self.scope)
        return body


def app_stream(app: AppState) -> str:
    return f"application-{app.client_id}"


def connection_stream(company_id: str, client_id: str) -> str:
    return f"connection-{company_id}-{client_id}"


def scope_from(raw: str | None, allowed: frozenset[str], default: frozenset[str]) -> list[str]:
    """Requested permissions, each of which must be allowed; none requested: `default`."""
    if raw is None or not raw.strip():
        return sorted(default)
    if len(raw) > MAX_SCOPE:
        raise InvalidScope("scope is too long")
    requested = list(dict.fromkeys(raw.split()))
    refused = [p for p in requested if p not in allowed]
    if refused:
        raise InvalidScope(f"not granted to this client: {' '.join(refused[:5])}")
    return requested


async def _append(
    ctx: Context,
    app: AppState,
    stream: str,
    expected: int | None,
    events: list[ev.Event],
    meta: Metadata,
    extra: list[tuple[str, int]] | None = None,
) -> None:
    # The application must still be at the version the client was authenticated against:
    # a rotation that committed first makes this fail, so an old secret cannot slip through.
    # Likewise the connection a token is issued through: one revoked first wins.
    conditions = [(app_stream(app), app.version), *(extra or [])]
    try:
        await ctx.eventlog.append(stream, expected, events, meta, conditions=conditions)
    except ConcurrencyError as exc:
        if exc.stream_id in {s for s, _ in conditions}:
            raise ApplicationChanged() from None
        raise


async def client_credentials(
    ctx: Context, app: AppState, scope: str | None, meta: Metadata
) -> Issued:
    if app.grant_type != CLIENT_CREDENTIALS:
        raise UnauthorizedClient("this client may not use the client_credentials grant")
    permissions = scope_from(scope, app.permissions, app.permissions)
    token = tokens.new(tokens.ACCESS)
    token_hash = tokens.token_hash(token)
    # A lone token: its family id is derived from its hash, so the read model needs no
    # family record for it (memory per live token is what bounds a process).
    family_id = lone_family(token_hash)
    event = ev.AccessTokenIssued(
        company_id=app.company_id,
        client_id=app.client_id,
        family_id=family_id,
        grant_type=CLIENT_CREDENTIALS,
        token_hash=token_hash,
        permissions=permissions,
        issued_at=int(time.time()),
        expires_at=None,  # the seed: these tokens do not expire
    )
    await _append(ctx, app, f"token-{family_id}", 0, [event], meta)
    ctx.count("token_issued", CLIENT_CREDENTIALS)
    return Issued(token, permissions)


def pkce_ok(verifier: str, challenge: str) -> bool:
    """RFC 7636 §4.6, S256: BASE64URL(SHA256(verifier)) == challenge."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return hmac.compare_digest(computed, challenge)


def family_of_code(code_hash: str) -> str:
    return "fam_" + code_hash[:40]


async def authorization_code(
    ctx: Context,
    app: AppState,
    code: str | None,
    redirect_uri: str | None,
    verifier: str | None,
    meta: Metadata,
) -> Issued:
    if app.grant_type != AUTHORIZATION_CODE:
        raise UnauthorizedClient("this client may not use the authorization_code grant")
    if not code:
        raise InvalidRequest("code is required")
    if not redirect_uri:  # an empty parameter is an omitted one (RFC 6749 §3.1)
        raise InvalidRequest("redirect_uri is required")
    if not tokens.well_formed(code, tokens.CODE):
        raise InvalidGrant("unknown, expired or spent authorization code")
    code_hash = tokens.token_hash(code)
    state = ctx.policy.codes.get(code_hash)
    if state is None:
        await ctx.refresh()
        state = ctx.policy.codes.get(code_hash)
    if state is None or state.client_id != app.client_id:
        raise InvalidGrant("unknown, expired or spent authorization code")
    family_id = family_of_code(code_hash)
    if state.redeemed:
        await _code_reused(ctx, app, state.company_id, code_hash, family_id, meta)
    if state.expires_at <= time.time():
        raise InvalidGrant("the authorization code has expired")
    if redirect_uri != state.redirect_uri:
        raise InvalidGrant("redirect_uri does not match the one of the authorization request")
    if state.code_challenge is not None:
        if not verifier:
            raise InvalidGrant("code_verifier is required (PKCE)")
        if not VERIFIER.match(verifier):
            raise InvalidGrant("code_verifier must be 43 to 128 unreserved characters")
        if not pkce_ok(verifier, state.code_challenge):
            raise InvalidGrant("code_verifier does not match the code_challenge")
    elif verifier:
        raise InvalidGrant("no code_challenge was sent for this code")
    connection = ctx.policy.connections.get((state.company_id, app.client_id))
    if connection is None:
        raise InvalidGrant("the connection behind this code was revoked")
    # Consent that was given, less what the application or the connection lost since.
    permissions = [
        p for p in state.permissions if p in app.permissions and p in connection.permissions
    ]
    now = int(time.time())
    access, refresh = tokens.new(tokens.ACCESS), tokens.new(tokens.REFRESH)
    ids = {"company_id": state.company_id, "client_id": app.client_id}
    events: list[ev.Event] = [
        ev.AuthorizationCodeRedeemed(**ids, code_hash=code_hash, family_id=family_id),
        ev.AccessTokenIssued(
            **ids,
            family_id=family_id,
            grant_type=AUTHORIZATION_CODE,
            token_hash=tokens.token_hash(access),
            permissions=permissions,
            issued_at=now,
            expires_at=now + ACCESS_TOKEN_TTL,
            refresh_token_hash=tokens.token_hash(refresh),
            owner_company_id=app.company_id,
            refresh_expires_at=now + REFRESH_TOKEN_TTL,
        ),
    ]
    try:
        # One family per code: a second redemption finds the stream taken.
        await _append(
            ctx, app, f"token-{family_id}", 0, events, meta,
            [(connection_stream(state.company_id, app.client_id), connection.version)],
        )  # fmt: skip
    except ConcurrencyError:
        await _code_reused(ctx, app, state.company_id, code_hash, family_id, meta)
    ctx.count("token_issued", AUTHORIZATION_CODE)
    return Issued(access, permissions, refresh, ACCESS_TOKEN_TTL)


async def _code_reused(
    ctx: Context, app: AppState, company_id: str, code_hash: str, family_id: str, meta: Metadata
) -> None:
    """RFC 6749 §4.1.2: a code used twice revokes what the first use produced."""
    ids = {"company_id": company_id, "client_id": app.client_id}
    events: list[ev.Event] = [
        ev.AuthorizationCodeReused(
            **ids, code_hash=code_hash, family_id=family_id, ip=meta.client_ip or ""
        ),
        # Always: the first redemption may have happened in another process whose event
        # this one has not applied yet. A family revoked twice stays revoked.
        ev.TokenRevoked(**ids, family_id=family_id, reason="code_reuse"),
    ]
    await ctx.record(f"token-{family_id}", None, events, meta)  # visible here at once
    ctx.count("token_revoked", "code_reuse")
    raise InvalidGrant("the authorization code was already used; its tokens are revoked")


async def refresh_token(
    ctx: Context, app: AppState, refresh: str | None, scope: str | None, meta: Metadata
) -> Issued:
    if app.grant_type != AUTHORIZATION_CODE:
        raise UnauthorizedClient("this client may not use the refresh_token grant")
    if not refresh:
        raise InvalidRequest("refresh_token is required")
    if not tokens.well_formed(refresh, tokens.REFRESH):
        raise InvalidGrant("unknown, expired or revoked refresh token")
    refresh_hash = tokens.token_hash(refresh)
    family_id = ctx.policy.refresh_tokens.get(refresh_hash)
    if family_id is None:
        await ctx.refresh()
        family_id = ctx.policy.refresh_tokens.get(refresh_hash)
    family = ctx.policy.families.get(family_id) if family_id is not None else None
    if family is None or family_id is None or family.client_id != app.client_id:
        raise InvalidGrant("unknown, expired or revoked refresh token")
    if family.refresh_token_hash != refresh_hash:
        await _refresh_reused(ctx, app, family.company_id, family_id, refresh_hash, meta)
    if family.refresh_expires_at is not None and family.refresh_expires_at <= time.time():
        raise InvalidGrant("the refresh token has expired")
    connection = ctx.policy.connections.get((family.company_id, app.client_id))
    if connection is None:
        raise InvalidGrant("the connection behind this token was revoked")
    allowed = family.permissions & app.permissions & connection.permissions
    permissions = scope_from(scope, allowed, allowed)
    now = int(time.time())
    access, new_refresh = tokens.new(tokens.ACCESS), tokens.new(tokens.REFRESH)
    event = ev.TokenRefreshed(
        company_id=family.company_id,
        client_id=app.client_id,
        family_id=family_id,
        spent_refresh_token_hash=refresh_hash,
        token_hash=tokens.token_hash(access),
        refresh_token_hash=tokens.token_hash(new_refresh),
        permissions=permissions,
        issued_at=now,
        expires_at=now + ACCESS_TOKEN_TTL,
        refresh_expires_at=now + REFRESH_TOKEN_TTL,
    )
    try:
        await _append(
            ctx, app, f"token-{family_id}", family.version, [event], meta,
            [(connection_stream(family.company_id, app.client_id), connection.version)],
        )  # fmt: skip
    except ConcurrencyError:
        # Another request spent this refresh token first: this one is a reuse.
        await _refresh_reused(ctx, app, family.company_id, family_id, refresh_hash, meta)
    ctx.count("token_issued", "refresh_token")
    return Issued(access, permissions, new_refresh, ACCESS_TOKEN_TTL)


async def _refresh_reused(
    ctx: Context, app: AppState, company_id: str, family_id: str, refresh_hash: str, meta: Metadata
) -> None:
    """RFC 9700 §4.14.2: a spent refresh token presented again revokes the family."""
    ids = {"company_id": company_id, "client_id": app.client_id, "family_id": family_id}
    events: list[ev.Event] = [
        ev.RefreshTokenReused(**ids, refresh_token_hash=refresh_hash, ip=meta.client_ip or ""),
        ev.TokenRevoked(**ids, reason="refresh_reuse"),
    ]
    await ctx.record(f"token-{family_id}", None, events, meta)  # visible here at once
    ctx.count("token_revoked", "refresh_reuse")
    raise InvalidGrant("this refresh token was already used; the whole grant is revoked")
