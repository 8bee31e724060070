"""The token rules: client_credentials, code redemption (with PKCE), refresh rotation with
reuse detection, and revocation. Values in, a decision out: no I/O, no clock, no
randomness. The caller passes the time and the hashes of the tokens it made, and records
what the decision says (https://www.rfc-editor.org/rfc/rfc6749#section-4)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

from service import events as ev
from service.domain import streams
from service.domain.applications import AUTHORIZATION_CODE, CLIENT_CREDENTIALS
from service.domain.client_keys import NONE
from service.domain.dpop import InvalidDpopProof
from service.domain.state import AppState, CodeState, ConnectionState, FamilyState
from service.oauth.errors import (
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    OAuthError,
    UnauthorizedClient,
)

REFRESH_TOKEN = "refresh_token"  # noqa: S105  (a grant type, not a secret)


@dataclass(frozen=True)
class Lifetime:
    """How long what a grant issues lives, in seconds; None: the access token never expires,
    or no refresh token is issued."""

    access: int | None
    refresh: int | None


#: The seed's table: authorization_code tokens live 2 hours and come with a refresh token;
#: client_credentials tokens never expire and come without one.
LIFETIMES: Mapping[str, Lifetime] = {
    AUTHORIZATION_CODE: Lifetime(access=2 * 3600, refresh=30 * 86400),
    CLIENT_CREDENTIALS: Lifetime(access=None, refresh=None),
}
CODE_TTL = 600  # at most 10 minutes (RFC 6749 §4.1.2)
MAX_SCOPE = 2000
VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}\Z")  # RFC 7636 §4.1


@dataclass(frozen=True)
class Record:
    """Events to append to `stream` at `expected_version` (None: any), on condition that
    each of `conditions` (stream, version) still holds."""

    stream: str
    expected_version: int | None
    events: tuple[ev.Event, ...]
    conditions: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Refusal:
    """A security signal to record, then the error to answer with."""

    record: Record
    error: OAuthError


@dataclass(frozen=True)
class Issue:
    """Tokens to issue: `record` them, then answer with `scope` (and a refresh token when
    `refresh`). A conflict on the token's own stream means another request won the race
    for the same code or refresh token: decide again on what it recorded, and if that
    cannot be seen, `conflict` says what to record and answer. A conflict on a condition
    stream (the application, the connection) means it changed after the client was
    authenticated: authenticate again."""

    record: Record
    scope: list[str]
    expires_in: int | None
    refresh: bool = False
    conflict: Refusal | None = None
    #: recorded once `record` has committed (each on a stream of its own)
    then: tuple[Record, ...] = ()

    @property
    def condition_streams(self) -> frozenset[str]:
        return frozenset(stream for stream, _ in self.record.conditions)


def scope_from(raw: str | None, allowed: frozenset[str], default: frozenset[str]) -> list[str]:
    """Requested permissions, each of which must be allowed; none requested: `default`
    (RFC 6749 §3.3)."""
    if raw is None or not raw.strip():
        return sorted(default)
    if len(raw) > MAX_SCOPE:
        raise InvalidScope("scope is too long")
    requested = list(dict.fromkeys(raw.split()))
    refused = [p for p in requested if p not in allowed]
    if refused:
        raise InvalidScope(f"not granted to this client: {' '.join(refused[:5])}")
    return requested


def pkce_ok(verifier: str, challenge: str) -> bool:
    """RFC 7636 §4.6, S256: BASE64URL(SHA256(verifier)) == challenge."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return hmac.compare_digest(computed, challenge)


def _app_condition(app: AppState) -> tuple[str, int]:
    # The application must still be at the version the client was authenticated against:
    # a secret rotation that committed first fails the append, so an old secret cannot
    # slip through in a process that had not seen the rotation yet.
    return (streams.application(app.client_id), app.version)


# --- client_credentials (RFC 6749 §4.4) ------------------------------------------------


def client_credentials(
    app: AppState,
    scope: str | None,
    access_hash: str,
    now: int,
    superseded: tuple[str, ...] = (),
    jkt: str = "",
) -> Issue:
    """`superseded`: the hashes of the application's oldest live tokens, as many as must
    go for the new one to stay within its limit of live tokens. These tokens never
    expire: without a limit, a client that asks for a token per call grows every process's
    memory for ever. `jkt`: the DPoP key the token is bound to ("": a Bearer token)."""
    if app.grant_type != CLIENT_CREDENTIALS:
        raise UnauthorizedClient("this client may not use the client_credentials grant")
    permissions = scope_from(scope, app.permissions, app.permissions)
    lifetime = LIFETIMES[CLIENT_CREDENTIALS]
    family_id = streams.lone_family(access_hash)
    event = ev.AccessTokenIssued(
        company_id=app.company_id,
        client_id=app.client_id,
        family_id=family_id,
        grant_type=CLIENT_CREDENTIALS,
        token_hash=access_hash,
        permissions=permissions,
        issued_at=now,
        expires_at=None if lifetime.access is None else now + lifetime.access,
        dpop_jkt=jkt,
    )
    record = Record(streams.token_family(family_id), 0, (event,), (_app_condition(app),))
    return Issue(record, permissions, lifetime.access, then=supersede(app, superseded))


def supersede(app: AppState, token_hashes: tuple[str, ...]) -> tuple[Record, ...]:
    """Revoke each of these lone tokens; two processes superseding the same one revoke it
    twice, which leaves it revoked."""
    records = []
    for token_hash in token_hashes:
        family_id = streams.lone_family(token_hash)
        event = ev.TokenRevoked(
            company_id=app.company_id,
            client_id=app.client_id,
            family_id=family_id,
            reason="superseded",
        )
        records.append(Record(streams.token_family(family_id), None, (event,)))
    return tuple(records)


# --- authorization_code (RFC 6749 §4.1.3, RFC 7636 §4.6) --------------------------------


def redeem_code(
    app: AppState,
    code_hash: str,
    code: CodeState | None,
    redirect_uri: str | None,
    verifier: str | None,
    connection: ConnectionState | None,
    tokens: tuple[str, str],
    now: int,
    ip: str,
    jkt: str = "",
) -> Issue | Refusal:
    """`tokens`: the hashes of the new access and refresh tokens; `jkt`: the key of the
    request's DPoP proof ("": none): the access token is bound to it, and a public client's
    grant from now on (RFC 9449 §5)."""
    if app.grant_type != AUTHORIZATION_CODE:
        raise UnauthorizedClient("this client may not use the authorization_code grant")
    if code is None or code.client_id != app.client_id:
        raise InvalidGrant("unknown, expired or spent authorization code")
    family_id = streams.code_family(code_hash)
    reuse = _code_reused(app, code.company_id, code_hash, family_id, ip)
    if code.redeemed:
        return reuse
    if code.expires_at <= now:
        raise InvalidGrant("the authorization code has expired")
    # RFC 6749 §4.1.3: the redirect URI the authorization request named, if it named one
    if redirect_uri is None and code.redirect_uri_given:
        raise InvalidRequest("redirect_uri is required: the authorization request named one")
    if redirect_uri is not None and redirect_uri != code.redirect_uri:
        raise InvalidGrant("redirect_uri does not match the one of the authorization request")
    _check_pkce(code.code_challenge, verifier)
    if code.dpop_jkt is not None and not hmac.compare_digest(code.dpop_jkt, jkt):
        # RFC 9449 §10: checked before the code is spent, like the verifier
        raise InvalidGrant("this code is bound to a DPoP key (dpop_jkt): send a proof signed by it")
    if connection is None:
        raise InvalidGrant("the connection behind this code was revoked")
    # Consent that was given, less what the application or the connection lost since.
    permissions = [
        p for p in code.permissions if p in app.permissions and p in connection.permissions
    ]
    lifetime = LIFETIMES[AUTHORIZATION_CODE]
    assert lifetime.access is not None
    access_hash, refresh_hash = tokens
    ids = {"company_id": code.company_id, "client_id": app.client_id}
    events = (
        ev.AuthorizationCodeRedeemed(**ids, code_hash=code_hash, family_id=family_id),
        ev.AccessTokenIssued(
            **ids,
            family_id=family_id,
            grant_type=AUTHORIZATION_CODE,
            token_hash=access_hash,
            permissions=permissions,
            issued_at=now,
            expires_at=now + lifetime.access,
            refresh_token_hash=refresh_hash,
            owner_company_id=app.company_id,
            refresh_expires_at=None if lifetime.refresh is None else now + lifetime.refresh,
            dpop_jkt=jkt,
            # RFC 9449 §5: a public client's refresh token is bound to the proof's key; a
            # confidential client's is held to the client's authentication, so that it can
            # change keys without losing the grant
            binds_grant=bool(jkt) and app.auth_method == NONE,
        ),
    )
    conditions = (
        _app_condition(app),
        (streams.connection(code.company_id, app.client_id), connection.version),
    )
    # One family per code: a second redemption finds the stream taken.
    record = Record(streams.token_family(family_id), 0, events, conditions)
    return Issue(record, permissions, lifetime.access, refresh=True, conflict=reuse)


def _check_pkce(challenge: str | None, verifier: str | None) -> None:
    if challenge is not None:
        if not verifier:
            raise InvalidGrant("code_verifier is required (PKCE)")
        if not VERIFIER.match(verifier):
            raise InvalidGrant("code_verifier must be 43 to 128 unreserved characters")
        if not pkce_ok(verifier, challenge):
            raise InvalidGrant("code_verifier does not match the code_challenge")
    elif verifier:
        raise InvalidGrant("no code_challenge was sent for this code")


def _code_reused(
    app: AppState, company_id: str, code_hash: str, family_id: str, ip: str
) -> Refusal:
    """RFC 6749 §4.1.2: a code used twice revokes what the first use produced. Always
    recorded with the revocation: the first redemption may have happened in another
    process whose event this one has not applied yet, and a family revoked twice stays
    revoked."""
    ids = {"company_id": company_id, "client_id": app.client_id}
    events = (
        ev.AuthorizationCodeReused(**ids, code_hash=code_hash, family_id=family_id, ip=ip),
        ev.TokenRevoked(**ids, family_id=family_id, reason="code_reuse"),
    )
    return Refusal(
        Record(streams.token_family(family_id), None, events),
        InvalidGrant("the authorization code was already used; its tokens are revoked"),
    )


# --- refresh_token (RFC 6749 §6, RFC 9700 §4.14.2) --------------------------------------


def refresh(
    app: AppState,
    refresh_hash: str,
    found: tuple[str, FamilyState] | None,
    connection: ConnectionState | None,
    scope: str | None,
    tokens: tuple[str, str],
    now: int,
    ip: str,
    grace: int = 0,
    jkt: str = "",
) -> Issue | Refusal:
    """`found`: the family the refresh token belongs to (live or spent), if any;
    `tokens`: the hashes of the new access and refresh tokens; `grace`: for how many
    seconds after a rotation a repeat of what it spent rotates again (see `_repeat_allowed`);
    `jkt`: the key of the request's DPoP proof ("": none), which a bound grant requires."""
    if app.grant_type != AUTHORIZATION_CODE:
        raise UnauthorizedClient("this client may not use the refresh_token grant")
    if found is None or found[1].client_id != app.client_id:
        raise InvalidGrant("unknown, expired or revoked refresh token")
    family_id, family = found
    reuse = _refresh_reused(app, family.company_id, family_id, refresh_hash, ip)
    # Handed out, then rotated away by a repeat before anyone presented it: of two
    # answers to one race, the client may have kept this one (FamilyState.unpresented).
    sibling = refresh_hash in family.unpresented
    repeat = family.refresh_token_hash != refresh_hash and not sibling
    if repeat and not _repeat_allowed(family, refresh_hash, now, grace):
        return reuse
    if family.refresh_expires_at is not None and family.refresh_expires_at <= now:
        raise InvalidGrant("the refresh token has expired")
    if connection is None:
        raise InvalidGrant("the connection behind this token was revoked")
    _same_key(family.jkt, jkt)
    # RFC 6749 §6: any part of the original grant, less what was taken away since.
    allowed = family.permissions & app.permissions & connection.permissions
    permissions = scope_from(scope, allowed, allowed)
    lifetime = LIFETIMES[AUTHORIZATION_CODE]
    assert lifetime.access is not None
    access_hash, new_refresh_hash = tokens
    event = ev.TokenRefreshed(
        company_id=family.company_id,
        client_id=app.client_id,
        family_id=family_id,
        spent_refresh_token_hash=refresh_hash,
        token_hash=access_hash,
        refresh_token_hash=new_refresh_hash,
        permissions=permissions,
        issued_at=now,
        expires_at=now + lifetime.access,
        refresh_expires_at=None if lifetime.refresh is None else now + lifetime.refresh,
        grace_reuse=repeat,
        dpop_jkt=jkt,
        # RFC 9449 §5: a refresh token issued to a public client in answer to a request
        # with a proof is bound to its key (a confidential client's is held to the client's
        # own authentication instead)
        binds_grant=bool(jkt) and not family.jkt and app.auth_method == NONE,
    )
    conditions = (
        _app_condition(app),
        (streams.connection(family.company_id, app.client_id), connection.version),
    )
    record = Record(streams.token_family(family_id), family.version, (event,), conditions)
    # Another request that spent this refresh token first makes this one a repeat: within
    # the grace it is decided again against the new live one; after it, it is a reuse.
    return Issue(record, permissions, lifetime.access, refresh=True, conflict=reuse)


def _same_key(bound: str, presented: str) -> None:
    """RFC 9449 §5 (and §8 for public clients): a grant bound to a DPoP key is refreshed
    only with a proof by that key, and its new access token is bound to it too. A grant
    that is not bound may be refreshed with a proof: its new access token is bound, and a
    public client's grant with it (`binds_grant`)."""
    if bound and not presented:
        raise InvalidDpopProof("this grant is bound to a DPoP key; send a DPoP proof signed by it")
    if bound and not hmac.compare_digest(bound, presented):
        raise InvalidDpopProof("this grant is bound to another DPoP key; sign the proof with it")


#: At most this many repeats within one grace: a client retries once or twice, and the
#: family's state stays small whatever a thief with a spent refresh token sends.
GRACE_REPEATS = 5


def _repeat_allowed(family: FamilyState, refresh_hash: str, now: int, grace: int) -> bool:
    """A spent refresh token presented again is a theft signal (RFC 9700 §4.14.2), unless
    it is the one the family's last rotation spent (or one a repeat of it rotated away),
    presented within `grace` seconds of that rotation: a retry after a lost answer, or a
    request that lost a race with its twin. Such a repeat rotates from the live refresh
    token; the one it rotates away was handed out and never presented, so it stays good
    for its first presentation (`unpresented`, at most GRACE_REPEATS of them), which, like
    any rotation, spends every other refresh token of the family at once. A repeat never
    extends the grace; a rotation opens one for what it spent alone."""
    return (
        family.spent_at is not None
        and now < family.spent_at + grace
        and refresh_hash in family.recently_spent
        and len(family.recently_spent) <= GRACE_REPEATS
    )


def _refresh_reused(
    app: AppState, company_id: str, family_id: str, refresh_hash: str, ip: str
) -> Refusal:
    """RFC 9700 §4.14.2: a spent refresh token presented again revokes the family."""
    ids = {"company_id": company_id, "client_id": app.client_id, "family_id": family_id}
    events = (
        ev.RefreshTokenReused(**ids, refresh_token_hash=refresh_hash, ip=ip),
        ev.TokenRevoked(**ids, reason="refresh_reuse"),
    )
    return Refusal(
        Record(streams.token_family(family_id), None, events),
        InvalidGrant("this refresh token was already used; the whole grant is revoked"),
    )


# --- revocation (RFC 7009 §2.1) ---------------------------------------------------------


def revoke(
    client_id: str,
    family_id: str | None,
    owner: tuple[str, str] | None,
    token_hash: str,
    app_version: int | None = None,
) -> Record | None:
    """What revoking a token asked by `client_id` records: its family, when the token is a
    live one of this client; nothing otherwise (unknown, dead, or another client's token:
    the answer is 200 all the same, so a client cannot probe for others' tokens).
    `app_version`: the application's version the client was authenticated against, which
    must still hold (a secret rotated meanwhile, in any process, fails the append)."""
    if family_id is None or owner is None or owner[0] != client_id:
        return None
    conditions = () if app_version is None else ((streams.application(client_id), app_version),)
    event = ev.TokenRevoked(
        company_id=owner[1],
        client_id=client_id,
        family_id=family_id,
        reason="client_request",
        token_hash=token_hash,
    )
    return Record(streams.token_family(family_id), None, (event,), conditions)


#: Which kind of application may use each grant type of the token request.
APPLICATION_GRANT = {
    CLIENT_CREDENTIALS: CLIENT_CREDENTIALS,
    AUTHORIZATION_CODE: AUTHORIZATION_CODE,
    REFRESH_TOKEN: AUTHORIZATION_CODE,
}


def check_grant_type(app: AppState, grant_type: str) -> None:
    """RFC 6749 §5.2 unauthorized_client: the grant type is not this application's."""
    if APPLICATION_GRANT.get(grant_type) != app.grant_type:
        raise UnauthorizedClient(f"this client may not use the {grant_type} grant")
