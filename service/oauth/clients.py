"""Client authentication at the token, revocation and introspection endpoints: HTTP Basic
with form-urlencoded credentials, client_id and client_secret in the body, or a signed JWT
(`private_key_jwt`, oauth/assertions.py); exactly one of them. A public client (a native
app, RFC 8252) names itself with client_id alone, and is refused anything else. Secrets
are compared in constant time (RFC 6749 §2.3.1, RFC 9700 §2.5). An application registered
for private_key_jwt refuses a secret, and one registered for a secret refuses an assertion.
https://www.rfc-editor.org/rfc/rfc6749#section-2.3.1"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import msgspec
import structlog

from service.domain import credentials, policy
from service.domain.client_keys import NONE, PRIVATE_KEY_JWT
from service.domain.state import AppState
from service.eventlog import Metadata
from service.oauth import assertions
from service.oauth import credentials as authorization
from service.oauth.errors import InvalidClient, InvalidRequest, IpNotAllowed
from service.oauth.ports import Ledger, Lookups

log = structlog.get_logger(__name__)

MAX_CREDENTIAL = 256
_UNKNOWN = "0" * 64  # compared against for an unknown client: the same work either way


@dataclass(frozen=True)
class Secret:
    """client_secret_basic or client_secret_post."""

    client_id: str
    secret: str


@dataclass(frozen=True)
class Assertion:
    """private_key_jwt: `client_id` is the client the assertion claims (its sub)."""

    client_id: str
    value: str


@dataclass(frozen=True)
class Public:
    """token_endpoint_auth_method "none": the client_id alone (RFC 6749 §3.2.1)."""

    client_id: str


ClientAuth = Secret | Assertion | Public


def client_credentials(header: str | None, params: Mapping[str, str]) -> ClientAuth | None:
    """The client's credentials: a secret from the Basic header or the body, or a client
    assertion from the body; None if none. An empty parameter counts as omitted (RFC 6749
    §3.1)."""
    if params.get("client_assertion_type") or params.get("client_assertion"):
        return _assertion(header, params)
    found = _secret(header, params)
    if found is not None:
        return Secret(*found)
    named = params.get("client_id")
    return Public(named) if named and header is None else None


def _assertion(header: str | None, params: Mapping[str, str]) -> Assertion:
    """RFC 7521 §4.2: client_assertion_type and client_assertion, and client_id only if it
    names the same client."""
    if params.get("client_assertion_type") != assertions.ASSERTION_TYPE:
        raise InvalidClient(f"client_assertion_type must be {assertions.ASSERTION_TYPE}")
    value = params.get("client_assertion")
    if not value:
        raise InvalidRequest("client_assertion is required with client_assertion_type")
    if header is not None or params.get("client_secret"):
        raise InvalidRequest("use one client authentication method, not two (RFC 6749 §2.3)")
    claimed = assertions.claimed_client(value)
    named = params.get("client_id")
    if named and named != claimed:
        raise InvalidClient("the client_id is not the client the assertion is from")
    return Assertion(claimed, value)


def _secret(header: str | None, params: Mapping[str, str]) -> tuple[str, str] | None:
    """(client_id, client_secret) from the Basic header or the body; None if neither."""
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


def client_metadata(meta: Metadata, client: ClientAuth | None) -> Metadata:
    """The request's metadata with the client it claims to be as the actor."""
    actor = f"client:{client.client_id[:64]}" if client is not None else "client:"
    return msgspec.structs.replace(meta, actor=actor)


#: a single use (an assertion's, a DPoP proof's) to record once the request is granted
Spend = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class AssertionCheck:
    """What a client assertion is checked against besides the keys: the audiences it may
    name, the time, and whether its single use is still to be recorded (False when the
    same request authenticates again after the application changed)."""

    audiences: Sequence[str] = ()
    now: float | None = None
    record_use: bool = True
    #: where the assertion's single use goes when the request records it later, with its
    #: outcome (the token endpoint: once the grant is decided, so that a refused request
    #: records nothing); None: recorded as it is verified
    later: list[Spend] | None = None


async def authenticate(
    lookups: Lookups,
    ledger: Ledger,
    client: ClientAuth | None,
    meta: Metadata,
    check: AssertionCheck = AssertionCheck(),
) -> AppState:
    """The application whose credentials these are, or InvalidClient (401). A rotated-away
    secret is refused and recorded: a security signal for the application's admins."""
    if client is None:
        raise InvalidClient("client authentication is required")
    if isinstance(client, Assertion):
        return await _by_assertion(lookups, ledger, client, meta, check)
    if isinstance(client, Public):
        return await _public(lookups, client)
    client_id, secret = client.client_id, client.secret
    if not client_id or len(client_id) > MAX_CREDENTIAL or len(secret) > MAX_CREDENTIAL:
        raise InvalidClient()
    app = await lookups.application(client_id)
    if app is None:
        credentials.matches(secret, _UNKNOWN)
        raise InvalidClient()
    if app.auth_method == PRIVATE_KEY_JWT:
        credentials.matches(secret, _UNKNOWN)
        raise InvalidClient("this client authenticates with private_key_jwt, not a secret")
    if app.auth_method == NONE:
        if not secret:
            # Basic "client_id:" with an empty password is how some libraries send a
            # client_id alone (Go's oauth2, AuthStyleInHeader): a public client names itself
            return await _public(lookups, Public(client_id))
        credentials.matches(secret, _UNKNOWN)
        raise InvalidClient("a public client has no secret: send its client_id alone")
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


async def _public(lookups: Lookups, client: Public) -> AppState:
    """A client_id without credentials names a public client, or no client at all: a
    confidential client must authenticate (RFC 6749 §3.2.1)."""
    app = None
    if len(client.client_id) <= MAX_CREDENTIAL:
        app = await lookups.application(client.client_id)
    if app is None or app.auth_method != NONE:
        raise InvalidClient("client authentication is required")
    return app


async def _by_assertion(
    lookups: Lookups, ledger: Ledger, client: Assertion, meta: Metadata, check: AssertionCheck
) -> AppState:
    if len(client.client_id) > MAX_CREDENTIAL:
        raise InvalidClient()
    app = await lookups.application(client.client_id)
    if app is None:
        raise InvalidClient()
    if app.auth_method != PRIVATE_KEY_JWT:
        raise InvalidClient("this client authenticates with a client secret, not an assertion")
    now = time.time() if check.now is None else check.now
    try:
        verified = assertions.verify(app, client.value, check.audiences, now)
    except InvalidClient as exc:
        _assertion_refused(app, meta, exc)
        raise
    if check.record_use:
        spend = functools.partial(_spend_assertion, ledger, app, verified, meta)
        if check.later is not None:
            check.later.append(spend)
        else:
            await spend()
    return app


async def _spend_assertion(
    ledger: Ledger, app: AppState, verified: assertions.Verified, meta: Metadata
) -> None:
    try:
        await assertions.record_use(ledger, app, verified, meta)
    except InvalidClient as exc:  # used already
        _assertion_refused(app, meta, exc)
        raise


def _assertion_refused(app: AppState, meta: Metadata, exc: InvalidClient) -> None:
    # What was wrong, for the operator; never the assertion itself.
    log.warning(
        "security.client_assertion_refused",
        company_id=app.company_id,
        client_id=app.client_id,
        ip=meta.client_ip,
        reason=exc.description,
    )


async def allowed_or_refused(ledger: Ledger, app: AppState, meta: Metadata, endpoint: str) -> None:
    """SPEC §2: a correct client authentication from a disallowed address gets 403 and
    raises the same notification as a token used from there, at every endpoint that
    authenticates clients: otherwise a leaked secret could be checked there unseen. A
    public client authenticates with nothing: it gets the 403 alone."""
    ip = meta.client_ip or ""
    if not policy.ip_allowed(app, ip):
        if app.auth_method == NONE:
            # A public client's client_id is no credential (RFC 6749 §2.1): anyone who read
            # it in an authorization URL could send its admins an email from every address
            # they have. Refused all the same, and said in the log, not to the company.
            log.info("client.ip_not_allowed", client_id=app.client_id, ip=ip, endpoint=endpoint)
        else:
            await ledger.record(policy.client_violation(app, ip, endpoint), meta)
        raise IpNotAllowed(f"requests for this client are not allowed from {ip}")
