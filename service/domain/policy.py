"""The policy decision for a request that carries an access token (the gateway, the policy
check): is the token live, is the caller on its application's allow list, does it carry
the permission the route needs. Values in, a decision out; a valid token from a
disallowed address is revoked, and the decision says what to record."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from service import events as ev
from service.domain import addresses, streams
from service.domain.grants import Record
from service.domain.state import AppState, TokenState, networks_of
from service.oauth.errors import InsufficientScope, InvalidToken, OAuthError, TokenIpNotAllowed


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
    return _allowed(app.ip_allowlist, ip)


# The same few (allow list, address) pairs come back on every request: the answer is kept,
# keyed on the list's text (a changed list is another key, so it holds at once).
@functools.lru_cache(maxsize=8192)
def _allowed(allowlist: tuple[str, ...], ip: str) -> bool:
    address = _address(ip)
    if address is None:
        return False
    return any(address.version == net.version and address in net for net in networks_of(allowlist))


def effective_permissions(token: TokenState, app: AppState | None) -> frozenset[str]:
    """What a token may do now: what it was granted, less what its application lost since
    (removing a permission takes effect at once; adding one extends nothing)."""
    return token.permissions & app.permissions if app is not None else frozenset()


class Allowed(msgspec.Struct, frozen=True, gc=False):
    """Allowed (built on every request that carries a token: a Struct, quick to build)."""

    key: bytes
    token: TokenState
    app: AppState
    permissions: frozenset[str]  # what the token may do now


@dataclass(frozen=True)
class Violation:
    """A valid token from outside its allow list: record the revocation and the violation
    (None: the family was revoked meanwhile, nothing left to record), answer 403."""

    record: Record | None
    error: TokenIpNotAllowed


def decide(
    key: bytes,
    token: TokenState | None,
    app: AppState | None,
    family_version: Callable[[], int | None],
    ip: str,
    permission: str | None,
    endpoint: str,
    binding: OAuthError | None = None,
) -> Allowed | Violation:
    """`token` as the read model has it (None: unknown, expired or revoked), `family_version`
    gives the version of the token's family stream while it is live (asked only for a
    violation); `binding`: why the request
    does not fit the token's DPoP binding (service/domain/dpop.py), if it does not. The
    allow list comes first: a valid token from a disallowed address is a violation
    whatever its proof."""
    if token is None or app is None:
        raise InvalidToken("unknown, expired or revoked access token")
    if not ip_allowed(app, ip):
        return Violation(
            _revocation(key, token, app, family_version(), ip, endpoint),
            TokenIpNotAllowed(ip, revoked=True),
        )
    if binding is not None:
        raise binding
    permissions = effective_permissions(token, app)
    if permission is not None and permission not in permissions:
        raise InsufficientScope(permission)
    return Allowed(key, token, app, permissions)


def _revocation(
    key: bytes,
    token: TokenState,
    app: AppState,
    family_version: int | None,
    ip: str,
    endpoint: str,
) -> Record | None:
    """The family revoked and the violation recorded in one append, at the family's
    version: concurrent requests with the same token revoke it once. Conditional on the
    application's version too: an allow list changed in another process a moment before,
    that this process has not applied yet, fails the append, and the request is decided
    again on it (a revocation contradicting a change already committed is for good)."""
    if family_version is None:
        return None
    family_id = streams.family_of(key, token.family_id)
    events = (
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
    )
    condition = (streams.application(app.client_id), app.version)
    return Record(streams.token_family(family_id), family_version, events, (condition,))


def client_violation(app: AppState, ip: str, endpoint: str) -> Record:
    """Valid client credentials from outside the allow list (the token endpoint): there is
    no token to revoke, only the violation to record."""
    event = ev.IpViolationDetected(
        company_id=app.company_id, client_id=app.client_id, ip=ip, endpoint=endpoint
    )
    return Record(streams.violations(app.client_id), None, (event,))


def old_secret_used(app: AppState, ip: str) -> Record:
    """A rotated-away secret was presented: refused, and recorded as a security signal."""
    event = ev.OldClientSecretUsed(
        company_id=app.company_id,
        client_id=app.client_id,
        ip=ip,
        secret_version=app.secret_version,
    )
    return Record(streams.secret_use(app.client_id), None, (event,))


# --- coalescing: a flood of refused attempts is one event and a count ---------------------

#: A refused attempt with nothing to revoke: a stolen secret tried from a disallowed
#: address, or an old secret. Unlike a token, which dies once, it can be repeated for ever.
Signal = ev.IpViolationDetected | ev.OldClientSecretUsed


def coalescable(record: Record) -> Signal | None:
    """The signal in a record that may be coalesced, if it is one: an IP violation with no
    token revoked (the token, revocation and introspection endpoints), or an old secret
    used. A token's revocation is never coalesced: each token dies once, already bounded."""
    if len(record.events) != 1 or record.conditions:
        return None
    event = record.events[0]
    if isinstance(event, ev.IpViolationDetected):
        return None if event.token_revoked or event.family_id else event
    return event if isinstance(event, ev.OldClientSecretUsed) else None


def window_start(now: float, window: int) -> int:
    """Windows are aligned to multiples of `window` seconds since the epoch, so that every
    process agrees on them without talking to the others."""
    return int(now // window) * window


def signal_key(signal: Signal) -> str:
    """What one summary counts: the endpoint for a violation, the kind for an old secret."""
    return signal.endpoint if isinstance(signal, ev.IpViolationDetected) else "old_secret"


def first_in_window(signal: Signal, start: int) -> Record:
    """The window's first attempt, recorded as it always was, at version 0 of the window's
    own stream: one process records it, the others fail the append (ConcurrencyError) and
    learn that the window is open."""
    kind = "violations" if isinstance(signal, ev.IpViolationDetected) else "secret-use"
    return Record(streams.alert_window(kind, signal.client_id, signal.ip, start), 0, (signal,))


def coalesced(
    signal: Signal, count: int, first_at: float, last_at: float, start: int, window: int
) -> Record:
    """The attempts counted in a window after its first, as one summary on its stream."""
    counted: dict[str, Any] = {
        "company_id": signal.company_id, "client_id": signal.client_id, "ip": signal.ip,
        "count": count, "first_at": first_at, "last_at": last_at, "window_start": start,
        "window_seconds": window,
    }  # fmt: skip
    summary: ev.IpViolationsCoalesced | ev.OldClientSecretUsesCoalesced
    if isinstance(signal, ev.IpViolationDetected):
        summary = ev.IpViolationsCoalesced(endpoint=signal.endpoint, **counted)
    else:
        summary = ev.OldClientSecretUsesCoalesced(secret_version=signal.secret_version, **counted)
    return Record(first_in_window(signal, start).stream, None, (summary,))
