"""Client authentication at the token, revocation and introspection endpoints: HTTP Basic
with form-urlencoded credentials, or client_id and client_secret in the body; never both.
Secrets are compared in constant time (RFC 6749 §2.3.1, RFC 9700 §2.5).
https://www.rfc-editor.org/rfc/rfc6749#section-2.3.1"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import structlog

from service.domain import credentials, policy
from service.domain.state import AppState
from service.eventlog import Metadata
from service.oauth import credentials as authorization
from service.oauth.errors import InvalidClient, InvalidRequest, IpNotAllowed
from service.oauth.ports import Ledger, Lookups

log = structlog.get_logger(__name__)

MAX_CREDENTIAL = 256
_UNKNOWN = "0" * 64  # compared against for an unknown client: the same work either way


def client_credentials(header: str | None, params: Mapping[str, str]) -> tuple[str, str] | None:
    """(client_id, client_secret) from the Basic header or the body; None if neither.
    An empty parameter counts as omitted (RFC 6749 §3.1)."""
    in_body = bool(params.get("client_secret"))
    found = authorization.parse(header)
    if found is None:
        return (params.get("client_id", ""), params["client_secret"]) if in_body else None
    if not isinstance(found, authorization.Basic) and found != authorization.Unreadable("basic"):
        raise InvalidClient("use HTTP Basic or client_id and client_secret in the body")
    if in_body:
        raise InvalidRequest("use one client authentication method, not two (RFC 6749 §2.3)")
    if not isinstance(found, authorization.Basic):
        raise InvalidClient("malformed Basic credentials")
    # Which client is this? Two different answers in one request: refused, not guessed.
    named = params.get("client_id")
    if named and named != found.client_id:
        raise InvalidRequest("the client_id in the body is not the one in the Basic credentials")
    return found.client_id, found.secret


def client_metadata(meta: Metadata, client: tuple[str, str] | None) -> Metadata:
    """The request's metadata with the client it claims to be as the actor."""
    actor = f"client:{client[0][:64]}" if client is not None else "client:"
    return msgspec.structs.replace(meta, actor=actor)


async def authenticate(
    lookups: Lookups, ledger: Ledger, client: tuple[str, str] | None, meta: Metadata
) -> AppState:
    """The application whose credentials these are, or InvalidClient (401). A rotated-away
    secret is refused and recorded: a security signal for the application's admins."""
    if client is None:
        raise InvalidClient("client authentication is required")
    client_id, secret = client
    if not client_id or len(client_id) > MAX_CREDENTIAL or len(secret) > MAX_CREDENTIAL:
        raise InvalidClient()
    app = await lookups.application(client_id)
    if app is None:
        credentials.matches(secret, _UNKNOWN)
        raise InvalidClient()
    if credentials.matches(secret, app.secret_hash):
        return app
    if any(credentials.matches(secret, old) for old in app.previous_secret_hashes):
        await ledger.record(policy.old_secret_used(app, meta.client_ip or ""), meta)
        # Answered like any wrong secret: a different answer would confirm to whoever holds
        # a leaked old secret that it was once genuine. The event tells the admins.
        raise InvalidClient()
    # A known client with a wrong secret: guessing, or a deployment with a stale secret.
    log.warning(
        "security.client_secret_wrong",
        company_id=app.company_id,
        client_id=app.client_id,
        ip=meta.client_ip,
    )
    raise InvalidClient()


async def allowed_or_refused(ledger: Ledger, app: AppState, meta: Metadata, endpoint: str) -> None:
    """SPEC §2: a correct client authentication from a disallowed address gets 403 and
    raises the same notification as a token used from there, at every endpoint that
    authenticates clients: otherwise a leaked secret could be checked there unseen."""
    ip = meta.client_ip or ""
    if not policy.ip_allowed(app, ip):
        await ledger.record(policy.client_violation(app, ip, endpoint), meta)
        raise IpNotAllowed(f"requests for this client are not allowed from {ip}")
