"""The event catalogue: every fact Tollgate records, as frozen, tagged msgspec Structs.

Rules this module keeps:
- Events are named in the past tense; a tag is never renamed; fields only grow, and a new
  field always has a default, so old payloads still decode.
- No field holds a secret in clear. Client secrets, admin keys, resource-server keys,
  access and refresh tokens and authorization codes appear only as SHA-256 digests
  (hex, `*_hash`); passwords only as argon2id hashes.
- When a shape changes incompatibly, bump `SCHEMA_VERSIONS[tag]` and register an upcaster
  from the old version: stored events are upcast when read, never rewritten.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import msgspec


class Event(msgspec.Struct, frozen=True, tag=True, kw_only=True, gc=False):
    """Base of every event; the tag is the class name and is stored as the event type.

    `gc=False`: events hold only strings, numbers and lists of them, so they cannot form
    reference cycles; untracked, hundreds of thousands of them cost the collector nothing.
    """

    #: the company an event concerns, for tenant-scoped history (None: system-wide)
    tenant_field: ClassVar[str | None] = "company_id"


# --- companies, people, keys ---------------------------------------------------------


class CompanyCreated(Event, frozen=True):
    company_id: str
    name: str


class UserAdded(Event, frozen=True):
    company_id: str
    user_id: str
    email: str
    role: str  # "admin" | "member"
    password_hash: str  # argon2id


class UserRoleChanged(Event, frozen=True):
    company_id: str
    user_id: str
    before: str
    after: str


class UserPasswordChanged(Event, frozen=True):
    company_id: str
    user_id: str
    password_hash: str  # argon2id


class UserRemoved(Event, frozen=True):
    company_id: str
    user_id: str


class AdminKeyIssued(Event, frozen=True):
    company_id: str
    key_id: str
    key_hash: str
    label: str = ""
    #: the admin whose key it is (issued from their session, or with a key of theirs): it
    #: is revoked when they are removed or stop being an admin. None: issued by the CLI, or
    #: before keys were tied to a person.
    issued_by: str | None = None


class AdminKeyRevoked(Event, frozen=True):
    company_id: str
    key_id: str


class ResourceServerRegistered(Event, frozen=True):
    tenant_field: ClassVar[str | None] = None
    resource_server_id: str
    name: str
    key_hash: str


class ResourceServerKeyRevoked(Event, frozen=True):
    tenant_field: ClassVar[str | None] = None
    resource_server_id: str


# --- applications --------------------------------------------------------------------


class ApplicationCreated(Event, frozen=True):
    company_id: str
    client_id: str
    name: str
    grant_type: str  # "authorization_code" | "client_credentials"
    redirect_uri: str | None
    ip_allowlist: list[str]
    permissions: list[str]
    notification_emails: list[str]
    secret_hash: str


class ApplicationRenamed(Event, frozen=True):
    company_id: str
    client_id: str
    before: str
    after: str


class RedirectUriChanged(Event, frozen=True):
    company_id: str
    client_id: str
    before: str | None
    after: str | None


class IpAllowlistChanged(Event, frozen=True):
    company_id: str
    client_id: str
    before: list[str]
    after: list[str]


class PermissionsChanged(Event, frozen=True):
    """Removed permissions leave every grant and live token at once; added ones do not
    extend existing grants (users must authorise again)."""

    company_id: str
    client_id: str
    before: list[str]
    after: list[str]


class NotificationEmailsChanged(Event, frozen=True):
    company_id: str
    client_id: str
    before: list[str]
    after: list[str]


class ClientSecretRotated(Event, frozen=True):
    company_id: str
    client_id: str
    secret_hash: str
    secret_version: int


class ApplicationDeleted(Event, frozen=True):
    """Every token and connection of the application dies with it."""

    company_id: str
    client_id: str


class ApplicationTokensRevoked(Event, frozen=True):
    """The kill switch: every token of the application recorded before this event dies
    (access and refresh tokens, client_credentials tokens, codes not yet redeemed); the
    application, its client_id, its secret and its connections stay."""

    company_id: str
    client_id: str


class OldClientSecretUsed(Event, frozen=True):
    """A token request authenticated with a secret that has been rotated away."""

    company_id: str
    client_id: str
    ip: str
    secret_version: int


# --- connections and authorization codes ---------------------------------------------


class ConnectionGranted(Event, frozen=True):
    """A user of `company_id` consented to `client_id` with these permissions."""

    company_id: str
    client_id: str
    user_id: str
    permissions: list[str]


class ConnectionRevoked(Event, frozen=True):
    company_id: str
    client_id: str
    reason: str  # "admin_request" | "application_deleted"


class AuthorizationCodeIssued(Event, frozen=True):
    company_id: str
    client_id: str
    user_id: str
    code_hash: str
    redirect_uri: str
    permissions: list[str]
    code_challenge: str | None
    expires_at: int  # unix seconds
    #: the DPoP key the client bound the code to (RFC 9449 §10, `dpop_jkt`): redeemed only
    #: with a proof by that key
    dpop_jkt: str | None = None
    #: whether the authorization request named `redirect_uri`; False: it left it out and the
    #: code went to the one registered, and the token request need not name it (RFC 6749
    #: §4.1.3)
    redirect_uri_given: bool = True


class AuthorizationCodeRedeemed(Event, frozen=True):
    company_id: str
    client_id: str
    code_hash: str
    family_id: str


class AuthorizationCodeReused(Event, frozen=True):
    """A spent code was presented again: what it produced is revoked (RFC 6749 §4.1.2)."""

    company_id: str
    client_id: str
    code_hash: str
    family_id: str
    ip: str


# --- tokens --------------------------------------------------------------------------


class AccessTokenIssued(Event, frozen=True):
    """A token family starts: client_credentials, or an authorization code redeemed."""

    company_id: str
    client_id: str
    family_id: str
    grant_type: str
    token_hash: str
    permissions: list[str]
    issued_at: int  # unix seconds
    expires_at: int | None  # None: never expires (client_credentials)
    refresh_token_hash: str | None = None
    owner_company_id: str | None = None  # the application's owner, when not the grantor
    refresh_expires_at: int | None = None
    #: RFC 9449 §6.1: the thumbprint (RFC 7638) of the key the token is bound to; "": a
    #: Bearer token.
    dpop_jkt: str = ""
    #: whether the grant (its refresh token) is bound to `dpop_jkt` too: a public client's
    #: (RFC 9449 §5); a confidential client's refresh token is held to the client's own
    #: authentication, and a refresh may prove another key. None: recorded before the
    #: distinction, when every grant redeemed with a proof was bound
    binds_grant: bool | None = None


class TokenRefreshed(Event, frozen=True):
    """Refresh-token rotation: the old pair is spent, a new pair is live.

    `grace_reuse`: the refresh token presented had been spent a moment before (a client's
    retry after a lost answer, or two requests racing), within REFRESH_REUSE_GRACE: the new
    pair rotates from the family's live refresh token, which is spent with it."""

    company_id: str
    client_id: str
    family_id: str
    spent_refresh_token_hash: str
    token_hash: str
    refresh_token_hash: str
    permissions: list[str]
    issued_at: int
    expires_at: int
    refresh_expires_at: int | None = None
    grace_reuse: bool = False
    dpop_jkt: str = ""  # the new access token's DPoP key thumbprint; "": a Bearer token
    #: the grant, not bound to a key until now, is bound to `dpop_jkt` from here on: a
    #: public client's refresh with a proof (RFC 9449 §5)
    binds_grant: bool = False


class RefreshTokenReused(Event, frozen=True):
    """A spent refresh token was presented again (RFC 9700 §4.14.2): the family dies."""

    company_id: str
    client_id: str
    family_id: str
    refresh_token_hash: str
    ip: str


class TokenRevoked(Event, frozen=True):
    """Every token of the family is dead. `reason`: ip_violation, client_request,
    refresh_reuse, code_reuse, connection_revoked, application_deleted, superseded (a
    client_credentials application's oldest token, past CC_TOKEN_LIMIT live ones)."""

    company_id: str
    client_id: str
    family_id: str
    reason: str
    ip: str | None = None
    token_hash: str | None = None  # the token that was presented, when one was


class IpViolationDetected(Event, frozen=True):
    """A valid credential was used from outside the application's allow list."""

    company_id: str  # the application's owner: its admins get the email
    client_id: str
    ip: str
    endpoint: str  # "api" | "token" | "policy_check"
    family_id: str | None = None
    token_revoked: bool = False


class ViolationNotificationSent(Event, frozen=True):
    """The email went to `recipients`. A server may take it for some recipients and not
    others: `refused` said no for good (5xx, or a mailbox it cannot take), `pending` said
    not now (4xx): those get it alone, later, and a later event on the same stream says
    how that went. The email is settled once an event on its stream leaves none pending."""

    company_id: str
    client_id: str
    violation_position: int
    recipients: list[str]
    refused: list[str] = []
    pending: list[str] = []


class ViolationNotificationFailed(Event, frozen=True):
    company_id: str
    client_id: str
    violation_position: int
    attempt: int
    error: str
    #: when the next attempt is due (unix seconds); None when none follows (given up) and
    #: in events written before retries were scheduled
    retry_at: float | None = None


class ViolationNotificationAbandoned(Event, frozen=True):
    """The email was given up, and is recorded as such, never dropped in silence."""

    company_id: str
    client_id: str
    violation_position: int
    attempts: int
    error: str  # the last attempt's failure
    #: "refused" (the recipients' server said 5xx time after time), "unsendable" (the
    #: message cannot be built), "expired" (failing for longer than NOTIFY_GIVE_UP_AFTER);
    #: events written before the reason was recorded were all refusals or unsendable
    reason: str = ""


class IpViolationsCoalesced(Event, frozen=True):
    """The attempts after the first in a window (VIOLATION_WINDOW) with one application's
    valid credentials, from one disallowed address, at one endpoint where there is no token
    to revoke: counted, not recorded one by one. The window's first attempt has its own
    IpViolationDetected; each process records at most one of these per window and endpoint.
    `first_at`, `last_at`: unix seconds of the first and the last attempt counted."""

    company_id: str
    client_id: str
    ip: str
    endpoint: str
    count: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    window_start: int = 0  # unix seconds, a multiple of window_seconds
    window_seconds: int = 0


class OldClientSecretUsesCoalesced(Event, frozen=True):
    """The uses of a rotated-away secret after the first in a window (VIOLATION_WINDOW)
    from one address, counted as IpViolationsCoalesced counts violations."""

    company_id: str
    client_id: str
    ip: str
    secret_version: int = 0
    count: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    window_start: int = 0
    window_seconds: int = 0


# --- client authentication settings and keys (appended: tags are never renamed) ------


class CcTokenLimitChanged(Event, frozen=True):
    """A client_credentials application's own bound on its live tokens; None: the
    CC_TOKEN_LIMIT setting, 0: no bound."""

    company_id: str
    client_id: str
    before: int | None
    after: int | None


class TokenEndpointAuthMethodChanged(Event, frozen=True):
    """How the application authenticates (RFC 7591 §2 `token_endpoint_auth_method`):
    "client_secret_basic" | "client_secret_post" (a secret, in either place) |
    "private_key_jwt" (a JWT signed with one of its keys, RFC 7523 §2.2)."""

    company_id: str
    client_id: str
    before: str
    after: str


class ClientKeyAdded(Event, frozen=True):
    """A public key the application signs its client assertions with: the public members
    of the JWK only (RFC 7517), never private material; `thumbprint`: RFC 7638, SHA-256."""

    company_id: str
    client_id: str
    kid: str
    thumbprint: str
    jwk: dict[str, str]


class ClientKeyRemoved(Event, frozen=True):
    company_id: str
    client_id: str
    kid: str
    thumbprint: str


class ClientAssertionAccepted(Event, frozen=True):
    """A client assertion (RFC 7523 §2.2) was accepted: appended at version 0 of a stream
    named after its `jti`, so a replay is refused in every process (RFC 7523 §3 item 7).
    `jti_hash`: SHA-256 of the client_id and the jti; never the assertion itself."""

    company_id: str
    client_id: str
    jti_hash: str
    kid: str
    expires_at: int  # unix seconds: the assertion's exp


# --- DPoP (RFC 9449; appended: tags are never renamed) --------------------------------


class DpopBoundAccessTokensChanged(Event, frozen=True):
    """RFC 9449 §5.2 `dpop_bound_access_tokens`: when true, every token request of the
    application must carry a valid DPoP proof, and its tokens are all DPoP-bound."""

    company_id: str
    client_id: str
    before: bool
    after: bool


class DpopProofAccepted(Event, frozen=True):
    """A DPoP proof (RFC 9449 §4.3) was accepted: appended at version 0 of a stream named
    after its key and `jti`, so a replay is refused in every process (RFC 9449 §11.1).
    `jti_hash`: SHA-256 of the key's thumbprint and the jti; never the proof itself.
    `endpoint`: "token" | "api" | "policy_check"."""

    company_id: str
    client_id: str
    jti_hash: str
    jkt: str
    endpoint: str
    expires_at: int  # unix seconds: when the proof's iat leaves the accepted window


#: An application's settings, each changed by its own event with `before` and `after`:
#: the event type, the setting's name (the field of the folded application and the column
#: of the `applications` table that `after` sets) and how people call it. The fold, both
#: read models, the history and the dashboard read this table, so a new setting is its
#: event class, a line here, its rule in service/domain/applications.py and its column.
APPLICATION_SETTINGS: dict[type[Event], tuple[str, str]] = {
    ApplicationRenamed: ("name", "name"),
    RedirectUriChanged: ("redirect_uri", "redirect URI"),
    IpAllowlistChanged: ("ip_allowlist", "IP allow list"),
    PermissionsChanged: ("permissions", "permissions"),
    NotificationEmailsChanged: ("notification_emails", "notification emails"),
    CcTokenLimitChanged: ("cc_token_limit", "token limit"),
    TokenEndpointAuthMethodChanged: ("token_endpoint_auth_method", "authentication method"),
    DpopBoundAccessTokensChanged: ("dpop_bound_access_tokens", "DPoP requirement"),
}

EVENT_TYPES: tuple[type[Event], ...] = (
    CompanyCreated, UserAdded, UserRoleChanged, UserPasswordChanged, UserRemoved,
    AdminKeyIssued, AdminKeyRevoked, ResourceServerRegistered, ResourceServerKeyRevoked,
    ApplicationCreated, ApplicationRenamed, RedirectUriChanged, IpAllowlistChanged,
    PermissionsChanged, NotificationEmailsChanged, ClientSecretRotated, ApplicationDeleted,
    OldClientSecretUsed, ConnectionGranted, ConnectionRevoked, AuthorizationCodeIssued,
    AuthorizationCodeRedeemed, AuthorizationCodeReused, AccessTokenIssued, TokenRefreshed,
    RefreshTokenReused, TokenRevoked, IpViolationDetected, ViolationNotificationSent,
    ViolationNotificationFailed, ViolationNotificationAbandoned, ApplicationTokensRevoked,
    IpViolationsCoalesced, OldClientSecretUsesCoalesced, CcTokenLimitChanged,
    TokenEndpointAuthMethodChanged, ClientKeyAdded, ClientKeyRemoved, ClientAssertionAccepted,
    DpopBoundAccessTokensChanged, DpopProofAccepted,
)  # fmt: skip

BY_TAG: dict[str, type[Event]] = {cls.__name__: cls for cls in EVENT_TYPES}

#: Current schema version of each event type (1 unless it has been upcast).
SCHEMA_VERSIONS: dict[str, int] = {tag: 1 for tag in BY_TAG}

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
#: (tag, from_version) → function turning that payload into the shape of from_version + 1.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}

_encoder = msgspec.json.Encoder(order="sorted")
# One decoder per type, built once: the tag is already known from the `type` column.
_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    tag: msgspec.json.Decoder(cls) for tag, cls in BY_TAG.items()
}


def type_of(event: Event) -> str:
    return type(event).__name__


def tenant_of(event: Event) -> str | None:
    field = event.tenant_field
    return getattr(event, field) if field else None


def encode(event: Event) -> bytes:
    """Canonical JSON (sorted keys): the bytes stored and hashed."""
    return _encoder.encode(event)


class UnknownEventType(ValueError):
    pass


class UnknownEvent(Event, frozen=True):
    """Stands for an event this version cannot read: its type, or its schema version, is
    newer (written by a newer Tollgate during a rolling deploy). Not in the catalogue:
    never appended. In-memory models skip it; SQL projections stop before it instead (see
    projections/runner.py), since moving their checkpoint past it would lose it for good."""

    tenant_field: ClassVar[str | None] = None
    type_name: str
    schema_version: int


def decode_or_unknown(tag: str, schema_version: int, payload: bytes | str | msgspec.Raw) -> Event:
    """`decode`, or UnknownEvent for what this version cannot read: a newer type or shape,
    or a payload that is not what its type says (tampering: `audit verify` names it)."""
    current = SCHEMA_VERSIONS.get(tag)
    if current is None or schema_version > current:
        return UnknownEvent(type_name=tag, schema_version=schema_version)
    try:
        return decode(tag, schema_version, payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return UnknownEvent(type_name=tag, schema_version=schema_version)


def decode(tag: str, schema_version: int, payload: bytes | str | msgspec.Raw) -> Event:
    """Decode a stored payload, upcasting an old shape to the current one first."""
    current = SCHEMA_VERSIONS.get(tag)
    if current is None or schema_version > current:
        raise UnknownEventType(f"{tag} (schema version {schema_version})")
    if schema_version == current:
        event: Event = _decoders[tag].decode(payload)
        return event
    data: dict[str, Any] = msgspec.json.decode(payload)
    for version in range(schema_version, current):
        data = UPCASTERS[(tag, version)](data)
    data["type"] = tag
    upcast: Event = msgspec.convert(data, BY_TAG[tag])
    return upcast
