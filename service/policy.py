"""The policy decision for a request that carries an access token: is the token live, is
the caller's address on its application's allow list, does it carry the permission the
route needs. A valid token from a disallowed address is revoked on the spot."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import structlog

from projections.memory import AppState, TokenState
from service import events as ev
from service.context import Context
from service.domain import addresses
from service.errors import TollgateError, Unauthorized
from service.eventlog import ConcurrencyError, Metadata
from service.oauth import tokens

REALM = "tollgate"

log = structlog.get_logger(__name__)


class InvalidToken(Unauthorized):
    """RFC 6750 §3.1: 401 invalid_token (no error code when no token was sent at all)."""

    def __init__(self, description: str, *, sent: bool = True) -> None:
        super().__init__(description, realm=REALM, sent=sent)


class InsufficientScope(TollgateError):
    error = "insufficient_scope"
    status = 403

    def __init__(self, permission: str) -> None:
        challenge = f'Bearer realm="{REALM}", error="insufficient_scope", scope="{permission}"'
        super().__init__(
            f"this token lacks the {permission} permission",
            headers={"WWW-Authenticate": challenge},
        )


class IpNotAllowed(TollgateError):
    error = "ip_not_allowed"
    status = 403

    def __init__(self, ip: str, *, revoked: bool) -> None:
        what = "the token has been revoked" if revoked else "no token was issued"
        challenge = f'Bearer realm="{REALM}", error="ip_not_allowed"'
        super().__init__(
            f"requests for this client are not allowed from {ip}; {what}",
            headers={"WWW-Authenticate": challenge},
        )


@functools.lru_cache(maxsize=4096)
def _address(ip: str) -> addresses.IPAddress | None:
    try:
        return addresses.ip_address(ip)
    except ValueError:
        return None  # not allowed anywhere


def ip_allowed(app: AppState, ip: str) -> bool:
    """An empty allow list allows every address (it is optional for authorization_code)."""
    if not app.networks:
        return True
    address = _address(ip)
    if address is None:
        return False
    return any(address.version == net.version and address in net for net in app.networks)


async def record_violation(
    ctx: Context, app: AppState, ip: str, endpoint: str, meta: Metadata
) -> int:
    """An IP violation where there is no token to revoke (the token endpoint)."""
    event = ev.IpViolationDetected(
        company_id=app.company_id, client_id=app.client_id, ip=ip, endpoint=endpoint
    )
    [position] = await ctx.eventlog.append(f"violations-{app.client_id}", None, [event], meta)
    ctx.count("ip_violation", endpoint)
    _log_violation(app, ip, endpoint, token_revoked=False)
    return position


def _log_violation(app: AppState, ip: str, endpoint: str, *, token_revoked: bool) -> None:
    """What an operator needs to act (who, from where, where): never the credential."""
    log.warning(
        "security.ip_violation",
        company_id=app.company_id,
        client_id=app.client_id,
        ip=ip,
        endpoint=endpoint,
        token_revoked=token_revoked,
    )


@dataclass(frozen=True)
class Allowed:
    key: bytes
    token: TokenState
    app: AppState
    permissions: frozenset[str]  # what the token may do now


async def live_token(ctx: Context, raw: str) -> tuple[bytes, TokenState]:
    """The token's key and state, or InvalidToken. Malformed tokens never reach a lookup;
    a miss catches up with the log once (the token may come from another process)."""
    if not tokens.well_formed(raw, tokens.ACCESS):
        raise InvalidToken("malformed access token")
    key = bytes.fromhex(tokens.token_hash(raw))
    token = ctx.policy.token(key, time.time())
    if token is None:
        await ctx.refresh()
        token = ctx.policy.token(key, time.time())
    if token is None:
        raise InvalidToken("unknown, expired or revoked access token")
    return key, token


async def decide(
    ctx: Context,
    raw: str,
    ip: str,
    permission: str | None,
    endpoint: str,
    meta: Metadata,
) -> Allowed:
    key, token = await live_token(ctx, raw)
    app = ctx.policy.apps.get(token.client_id)
    if app is None:
        raise InvalidToken("unknown, expired or revoked access token")
    if not ip_allowed(app, ip):
        await revoke_for_violation(ctx, key, token, app, ip, endpoint, meta)
        raise IpNotAllowed(ip, revoked=True)
    permissions = ctx.policy.effective_permissions(token)
    if permission is not None and permission not in permissions:
        raise InsufficientScope(permission)
    return Allowed(key, token, app, permissions)


async def revoke_for_violation(
    ctx: Context,
    key: bytes,
    token: TokenState,
    app: AppState,
    ip: str,
    endpoint: str,
    meta: Metadata,
) -> None:
    """Revoke the token's family and record the violation, in one append. Concurrent
    requests with the same token race on the family's version: it is revoked once."""
    family_id = ctx.policy.family_of(key, token)
    for _attempt in range(3):
        version = ctx.policy.family_version(family_id)
        if version is None:
            return  # revoked meanwhile (by a concurrent request, here or elsewhere)
        events: list[ev.Event] = [
            ev.TokenRevoked(
                company_id=token.company_id,
                client_id=token.client_id,
                family_id=family_id,
                reason="ip_violation",
                ip=ip,
                token_hash=key.hex(),
            ),
            ev.IpViolationDetected(
                company_id=app.company_id,
                client_id=app.client_id,
                ip=ip,
                endpoint=endpoint,
                family_id=family_id,
                token_revoked=True,
            ),
        ]
        try:
            await ctx.record(f"token-{family_id}", version, events, meta)
            ctx.count("ip_violation", endpoint)
            ctx.count("token_revoked", "ip_violation")
            _log_violation(app, ip, endpoint, token_revoked=True)
            return
        except ConcurrencyError:
            await ctx.refresh()
