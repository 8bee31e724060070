"""Applications: the rules of SPEC.md §2, as functions from commands to events."""

from __future__ import annotations

import ipaddress
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from email_validator import EmailNotValidError, validate_email
from yarl import URL

from service import events as ev
from service.domain import addresses, client_keys
from service.domain.client_keys import ClientKey
from service.errors import InvalidRequest

AUTHORIZATION_CODE = "authorization_code"
CLIENT_CREDENTIALS = "client_credentials"
GRANT_TYPES = (AUTHORIZATION_CODE, CLIENT_CREDENTIALS)
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
MAX_NAME = 100
MAX_URI = 2000
MAX_ALLOWLIST = 200
MAX_EMAILS = 20
MAX_CC_TOKEN_LIMIT = 10_000_000  # as the CC_TOKEN_LIMIT setting
#: what the authorization server adds to a redirect URI's query (RFC 6749 §4.1.2 and
#: §4.1.2.1, RFC 9207 §2): a registered URI that already holds one would carry it twice
#: ("MUST NOT be included more than once", RFC 6749 §3.1), and a client reading the first
#: `iss` or `state` would read the registered one
RESPONSE_PARAMETERS = frozenset({"code", "state", "iss", "error", "error_description", "error_uri"})


class FieldError(InvalidRequest):
    """An input that breaks a rule; `field` names it for the error description."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class GrantTypeImmutable(FieldError):
    def __init__(self) -> None:
        super().__init__("grant_type", "cannot be changed once the application has been created")


# --- field rules ---------------------------------------------------------------------


#: letters and symbols that show as nothing: Hangul fillers, the blank Braille pattern
_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800")
#: combining marks one character may carry (a name of "a" and 99 accents shows as a smear)
MAX_MARKS = 4


def name(value: str) -> str:
    """What the consent page shows a user: 1 to MAX_NAME characters, no control or format
    character, at least one that shows (not only spaces, fillers or marks), and no more
    than MAX_MARKS combining marks on one character."""
    cleaned = value.strip()
    if not 1 <= len(cleaned) <= MAX_NAME:
        raise FieldError("name", f"must be 1 to {MAX_NAME} characters")
    categories = [unicodedata.category(ch) for ch in cleaned]
    if any(category.startswith("C") for category in categories):
        raise FieldError("name", "must not contain control characters")
    shown = zip(cleaned, categories, strict=True)
    if not any(c[0] in "LNPS" and ch not in _BLANK for ch, c in shown):
        raise FieldError("name", "must have a character that shows")
    marks = 0
    for category in categories:
        marks = marks + 1 if category[0] == "M" else 0
        if marks > MAX_MARKS:
            raise FieldError("name", f"must not put more than {MAX_MARKS} marks on a character")
    return cleaned


def redirect_uri(value: str) -> str:
    """An absolute https URL (http only for loopback hosts), no fragment, no credentials.
    Stored exactly as given: it is compared by exact string match (RFC 9700 §4.1.3)."""
    if len(value) > MAX_URI:
        raise FieldError("redirect_uri", f"must be at most {MAX_URI} characters")
    if value != value.strip() or any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise FieldError("redirect_uri", "must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        raise FieldError("redirect_uri", "is not a valid URL") from None
    if parts.scheme not in ("https", "http") or not host:
        raise FieldError("redirect_uri", "must be an absolute https URL")
    if parts.scheme == "http" and host not in LOOPBACK_HOSTS:
        raise FieldError(
            "redirect_uri", "must use https (http is allowed for localhost, 127.0.0.1, [::1])"
        )
    if parts.fragment or "#" in value:
        raise FieldError("redirect_uri", "must not contain a fragment (RFC 6749 §3.1.2)")
    if parts.username is not None or parts.password is not None:
        raise FieldError("redirect_uri", "must not contain credentials")
    if not followable(value):
        raise FieldError("redirect_uri", "does not name a valid host")
    names = {key for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
    taken = sorted(names & RESPONSE_PARAMETERS)
    if taken:
        raise FieldError(
            "redirect_uri", f"must not hold {', '.join(taken)}: the authorization answer adds it"
        )
    return value


def followable(uri: str) -> bool:
    """Whether a browser sent to `uri` goes to the host it names, as the consent page shows
    it, and the answer's Location can be written at all: no "\\" (which browsers read as
    "/" in an http(s) URL, so "https://evil.example\\.bank.example/" goes to evil.example),
    no percent-encoded host (decoded by browsers), a host of letters, digits, "-", "." and
    "_" or an IP literal, which the redirect's URL parser (yarl, IDNA 2008) takes."""
    if "\\" in uri:
        return False
    host = urlsplit(uri).hostname or ""
    if _ip_literal(host):
        return True
    if not all(ch.isalnum() or ch in "-._" for ch in host):
        return False
    labels = host.rstrip(".").split(".")
    if _numeric(labels[-1]):
        return False  # browsers read the host as an IPv4 address (0x7f.1 is 127.0.0.1)
    if not all(_a_label_ok(label) for label in labels if label.startswith("xn--")):
        return False  # punycode that decodes to nothing a browser takes
    try:
        URL(uri)
    except (ValueError, UnicodeError):
        return False
    return True


def _numeric(label: str) -> bool:
    """A last label that makes the WHATWG URL parser read the host as IPv4: decimal
    digits, or 0x and hex digits."""
    if label.isascii() and label.isdigit():
        return True
    return label[:2] == "0x" and all(ch in "0123456789abcdef" for ch in label[2:])


def _a_label_ok(label: str) -> bool:
    """An `xn--` label whose punycode decodes to a name: some character that is not ASCII,
    none a control or a space."""
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
    except UnicodeError:
        return False
    return not decoded.isascii() and all(unicodedata.category(ch)[0] not in "CZ" for ch in decoded)


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)  # a zone ("%eth0") is not taken: no address of a network
    except ValueError:
        return False
    return "%" not in host


def ip_entry(value: str) -> str:
    """One address or CIDR range, normalised: '192.0.2.7', '2001:db8::/32'. An
    IPv4-mapped IPv6 address becomes the IPv4 address it maps."""
    raw = value.strip()
    try:
        if "/" not in raw:
            return str(addresses.ip_address(raw))
        if "%" in raw:
            raise ValueError("an IPv6 zone ID is not accepted")
        network = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        message = f"{value!r} is not an IP address or CIDR range ({exc})"
        raise FieldError("ip_allowlist", message) from None
    network = addresses.unmapped(network)
    if network.num_addresses == 1:
        return str(network.network_address)
    return str(network)


def ip_allowlist(values: Sequence[str]) -> list[str]:
    if len(values) > MAX_ALLOWLIST:
        raise FieldError("ip_allowlist", f"must have at most {MAX_ALLOWLIST} entries")
    return list(dict.fromkeys(ip_entry(v) for v in values))


def permissions(values: Sequence[str], catalogue: Mapping[str, str]) -> list[str]:
    if not values:
        raise FieldError("permissions", "must name at least one permission")
    unknown = [p for p in values if p not in catalogue]
    if unknown:
        raise FieldError("permissions", f"unknown permission(s): {', '.join(unknown[:5])}")
    return list(dict.fromkeys(values))


def notification_emails(values: Sequence[str]) -> list[str]:
    if len(values) > MAX_EMAILS:
        raise FieldError("notification_emails", f"must have at most {MAX_EMAILS} addresses")
    cleaned = []
    for value in values:
        try:
            address = validate_email(value, check_deliverability=False)
        except EmailNotValidError as exc:
            raise FieldError("notification_emails", f"{value!r}: {exc}") from None
        if address.ascii_email is None:
            # An IDN domain has an ASCII form (xn--), a local part in other scripts none:
            # only a server that speaks SMTPUTF8 (RFC 6531) takes it, and an alert that
            # most relays refuse is no alert.
            raise FieldError(
                "notification_emails",
                f"{value!r}: the part before the @ must be ASCII (few mail servers deliver "
                "to others)",
            )
        if "=?" in address.local_part:
            raise FieldError(
                "notification_emails",
                f"{value!r}: the part before the @ must not hold '=?', which mail programs "
                "read as an encoded word (RFC 2047)",
            )
        cleaned.append(address.normalized)
    return list(dict.fromkeys(cleaned))


def cc_token_limit(grant_type: str, value: int | None) -> int | None:
    """The application's own bound on its live client_credentials tokens (None: the
    CC_TOKEN_LIMIT setting; 0: no bound). Users' grants have no such bound."""
    if value is None:
        return None
    if grant_type != CLIENT_CREDENTIALS:
        raise FieldError("cc_token_limit", "applies to client_credentials applications only")
    if not 0 <= value <= MAX_CC_TOKEN_LIMIT:
        raise FieldError("cc_token_limit", f"must be 0 (no limit) to {MAX_CC_TOKEN_LIMIT}")
    return value


def auth_method(grant_type: str, value: str) -> str:
    """How the application authenticates; "none" (a public client, RFC 8252) only for
    users' grants: a client_credentials token would be anyone's who knows the client_id."""
    method = client_keys.auth_method(value)
    if method == client_keys.NONE and grant_type != AUTHORIZATION_CODE:
        raise FieldError(
            "token_endpoint_auth_method",
            "none (a public client) is for authorization_code applications only",
        )
    return method


def has_secret(method: str) -> bool:
    """Whether the application authenticates with its client_secret (and is shown one)."""
    return method in client_keys.SECRET_METHODS


# --- state ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Application:
    """An application as its stream tells it; `version` is the stream's version."""

    client_id: str
    company_id: str
    name: str
    grant_type: str
    redirect_uri: str | None
    ip_allowlist: list[str]
    permissions: list[str]
    notification_emails: list[str]
    secret_hash: str
    secret_version: int = 1
    deleted: bool = False
    version: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    changes: list[str] = field(default_factory=list)
    cc_token_limit: int | None = None
    token_endpoint_auth_method: str = client_keys.CLIENT_SECRET_BASIC
    keys: tuple[ClientKey, ...] = ()
    dpop_bound_access_tokens: bool = False


def fold(history: Iterable[tuple[ev.Event, int, float]]) -> Application | None:
    """Replay an application stream: (event, stream version, unix time) in order."""
    app: Application | None = None
    for event, version, at in history:
        if isinstance(event, ev.ApplicationCreated):
            app = Application(
                client_id=event.client_id,
                company_id=event.company_id,
                name=event.name,
                grant_type=event.grant_type,
                redirect_uri=event.redirect_uri,
                ip_allowlist=list(event.ip_allowlist),
                permissions=list(event.permissions),
                notification_emails=list(event.notification_emails),
                secret_hash=event.secret_hash,
                created_at=at,
            )
        elif app is None:
            continue
        elif (setting := ev.APPLICATION_SETTINGS.get(type(event))) is not None:
            after = event.after  # type: ignore[attr-defined]
            changes: dict[str, Any] = {
                setting[0]: list(after) if isinstance(after, list) else after
            }
            app = replace(app, **changes)
        elif isinstance(event, ev.ClientSecretRotated):
            app = replace(app, secret_hash=event.secret_hash, secret_version=event.secret_version)
        elif isinstance(event, ev.ApplicationDeleted):
            app = replace(app, deleted=True)
        elif isinstance(event, ev.ClientKeyAdded):
            key = ClientKey(event.kid, event.thumbprint, dict(event.jwk))
            app = replace(app, keys=(*app.keys, key))
        elif isinstance(event, ev.ClientKeyRemoved):
            app = replace(app, keys=tuple(k for k in app.keys if k.kid != event.kid))
        app = replace(app, version=version, updated_at=at)
    return app


# --- commands ------------------------------------------------------------------------


@dataclass(frozen=True)
class NewApplication:
    name: str
    grant_type: str
    redirect_uri: str | None = None
    ip_allowlist: Sequence[str] = ()
    permissions: Sequence[str] = ()
    notification_emails: Sequence[str] = ()
    cc_token_limit: int | None = None
    token_endpoint_auth_method: str = client_keys.CLIENT_SECRET_BASIC
    #: a JWK Set (RFC 7591 §2 `jwks`) as sent: checked by client_keys.jwks
    jwks: object = None
    #: RFC 9449 §5.2: every token request must carry a DPoP proof
    dpop_bound_access_tokens: bool = False


@dataclass(frozen=True)
class AllowlistLimits:
    """The widest allow-list entry (the shortest prefix) a client_credentials application
    may have, per IP version: the settings ALLOWLIST_MIN_PREFIX_V4 and _V6. The seed asks
    for an allow list "to mitigate the risks of a static token"; 0.0.0.0/0 mitigates
    nothing."""

    v4: int = 8
    v6: int = 32


def _check_breadth(allowlist: Sequence[str], limits: AllowlistLimits) -> None:
    for entry in allowlist:
        network = ipaddress.ip_network(entry)  # normalised by ip_entry
        v4 = network.version == 4
        limit = limits.v4 if v4 else limits.v6
        if network.prefixlen < limit:
            setting = "ALLOWLIST_MIN_PREFIX_V4" if v4 else "ALLOWLIST_MIN_PREFIX_V6"
            raise FieldError(
                "ip_allowlist",
                f"{entry} is broader than /{limit}, the widest IPv{network.version} range a "
                f"client_credentials application may allow (setting {setting})",
            )


def _check_notified(emails: Sequence[str]) -> None:
    if not emails:
        raise FieldError(
            "notification_emails",
            "needs at least one address for the client_credentials grant: IP-violation "
            "alerts for its never-expiring tokens go there",
        )


def _check_grant_rules(grant_type: str, redirect: str | None, allowlist: Sequence[str]) -> None:
    if grant_type == AUTHORIZATION_CODE and not redirect:
        raise FieldError("redirect_uri", "is required for the authorization_code grant")
    if grant_type == CLIENT_CREDENTIALS and not allowlist:
        raise FieldError(
            "ip_allowlist", "needs at least one entry for the client_credentials grant"
        )


def create(
    command: NewApplication,
    *,
    company_id: str,
    client_id: str,
    secret_hash: str,
    catalogue: Mapping[str, str],
    limits: AllowlistLimits = AllowlistLimits(),
) -> ev.ApplicationCreated:
    if command.grant_type not in GRANT_TYPES:
        raise FieldError("grant_type", f"must be one of {', '.join(GRANT_TYPES)}")
    redirect = None if command.redirect_uri is None else redirect_uri(command.redirect_uri)
    allowlist = ip_allowlist(command.ip_allowlist)
    _check_grant_rules(command.grant_type, redirect, allowlist)
    emails = notification_emails(command.notification_emails)
    if command.grant_type == CLIENT_CREDENTIALS:
        _check_breadth(allowlist, limits)
        _check_notified(emails)
    return ev.ApplicationCreated(
        company_id=company_id,
        client_id=client_id,
        name=name(command.name),
        grant_type=command.grant_type,
        redirect_uri=redirect,
        ip_allowlist=allowlist,
        permissions=permissions(command.permissions, catalogue),
        notification_emails=emails,
        secret_hash=secret_hash,
    )


def create_all(
    command: NewApplication,
    *,
    company_id: str,
    client_id: str,
    secret_hash: str,
    catalogue: Mapping[str, str],
    limits: AllowlistLimits = AllowlistLimits(),
) -> list[ev.Event]:
    """ApplicationCreated, then the settings it was created with beyond the first shape
    of that event (a token limit, an authentication method, keys), as their own events in
    the same append: the application never exists without them."""
    created = create(
        command,
        company_id=company_id,
        client_id=client_id,
        secret_hash=secret_hash,
        catalogue=catalogue,
        limits=limits,
    )
    ids = {"company_id": company_id, "client_id": client_id}
    out: list[ev.Event] = [created]
    limit = cc_token_limit(command.grant_type, command.cc_token_limit)
    if limit is not None:
        out.append(ev.CcTokenLimitChanged(**ids, before=None, after=limit))
    method = auth_method(command.grant_type, command.token_endpoint_auth_method)
    out += client_keys.method_change(company_id, client_id, client_keys.CLIENT_SECRET_BASIC, method)
    if command.jwks is not None:
        out += client_keys.add(company_id, client_id, (), client_keys.jwks(command.jwks))
    if command.dpop_bound_access_tokens:
        out.append(ev.DpopBoundAccessTokensChanged(**ids, before=False, after=True))
    return out


@dataclass(frozen=True)
class Patch:
    """Fields to change; None: leave as it is (redirect_uri: `clear_redirect_uri`)."""

    name: str | None = None
    grant_type: str | None = None
    redirect_uri: str | None = None
    clear_redirect_uri: bool = False
    ip_allowlist: Sequence[str] | None = None
    permissions: Sequence[str] | None = None
    notification_emails: Sequence[str] | None = None
    cc_token_limit: int | None = None
    clear_cc_token_limit: bool = False
    token_endpoint_auth_method: str | None = None
    dpop_bound_access_tokens: bool | None = None


def change(
    app: Application,
    patch: Patch,
    catalogue: Mapping[str, str],
    limits: AllowlistLimits = AllowlistLimits(),
) -> list[ev.Event]:
    """The events that apply `patch`, each with the value before and after; [] if nothing
    changes. Refuses a new grant type, and any result that breaks the grant's rules. The
    client_credentials limits (allow-list breadth, a notification address) hold for the
    fields the patch sets, so an application made before them can still be renamed."""
    if patch.grant_type is not None and patch.grant_type != app.grant_type:
        raise GrantTypeImmutable()
    ids = {"company_id": app.company_id, "client_id": app.client_id}
    out: list[ev.Event] = []
    if patch.name is not None and (new_name := name(patch.name)) != app.name:
        out.append(ev.ApplicationRenamed(**ids, before=app.name, after=new_name))
    new_redirect = app.redirect_uri
    if patch.clear_redirect_uri:
        new_redirect = None
    elif patch.redirect_uri is not None:
        new_redirect = redirect_uri(patch.redirect_uri)
    new_allowlist = app.ip_allowlist
    if patch.ip_allowlist is not None:
        new_allowlist = ip_allowlist(patch.ip_allowlist)
    _check_grant_rules(app.grant_type, new_redirect, new_allowlist)
    cc = app.grant_type == CLIENT_CREDENTIALS
    if cc and patch.ip_allowlist is not None:
        _check_breadth(new_allowlist, limits)
    if new_redirect != app.redirect_uri:
        out.append(ev.RedirectUriChanged(**ids, before=app.redirect_uri, after=new_redirect))
    if new_allowlist != app.ip_allowlist:
        out.append(ev.IpAllowlistChanged(**ids, before=app.ip_allowlist, after=new_allowlist))
    if patch.permissions is not None:
        new_permissions = permissions(patch.permissions, catalogue)
        if new_permissions != app.permissions:
            out.append(ev.PermissionsChanged(**ids, before=app.permissions, after=new_permissions))
    if patch.notification_emails is not None:
        emails = notification_emails(patch.notification_emails)
        if cc:
            _check_notified(emails)
        if emails != app.notification_emails:
            out.append(
                ev.NotificationEmailsChanged(**ids, before=app.notification_emails, after=emails)
            )
    return out + _client_auth_changes(app, patch)


def _client_auth_changes(app: Application, patch: Patch) -> list[ev.Event]:
    """The token limit, the authentication method and the DPoP requirement: how the
    application's clients get tokens, rather than what the tokens may do."""
    out: list[ev.Event] = []
    new_limit = app.cc_token_limit
    if patch.clear_cc_token_limit:
        new_limit = None
    elif patch.cc_token_limit is not None:
        new_limit = cc_token_limit(app.grant_type, patch.cc_token_limit)
    if new_limit != app.cc_token_limit:
        out.append(
            ev.CcTokenLimitChanged(
                company_id=app.company_id,
                client_id=app.client_id,
                before=app.cc_token_limit,
                after=new_limit,
            )
        )
    method = patch.token_endpoint_auth_method
    if method is not None:
        method = auth_method(app.grant_type, method)
    out += client_keys.method_change(
        app.company_id, app.client_id, app.token_endpoint_auth_method, method
    )
    dpop_bound = patch.dpop_bound_access_tokens
    if dpop_bound is not None and dpop_bound != app.dpop_bound_access_tokens:
        out.append(
            ev.DpopBoundAccessTokensChanged(
                company_id=app.company_id,
                client_id=app.client_id,
                before=app.dpop_bound_access_tokens,
                after=dpop_bound,
            )
        )
    return out


def rotate_secret(app: Application, secret_hash: str) -> ev.ClientSecretRotated:
    if app.token_endpoint_auth_method == client_keys.NONE:
        raise FieldError(
            "token_endpoint_auth_method",
            "a public client has no secret; change its method first to give it one",
        )
    return ev.ClientSecretRotated(
        company_id=app.company_id,
        client_id=app.client_id,
        secret_hash=secret_hash,
        secret_version=app.secret_version + 1,
    )


def delete(app: Application) -> ev.ApplicationDeleted:
    return ev.ApplicationDeleted(company_id=app.company_id, client_id=app.client_id)
