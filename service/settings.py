"""Frozen settings read from the environment (and an optional `.env`), never at import."""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import os
import re
import ssl
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, cast, get_args
from urllib.parse import urlsplit, urlunsplit

from service.domain.addresses import unmapped
from service.domain.permissions import CatalogueError, load_catalogue
from service.domain.routes import RoutesError, load_routes

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SmtpTls = Literal["starttls", "tls", "none"]
DpopNonce = Literal["off", "required"]
#: ASSERTION_AUDIENCE (service/oauth/assertions.py: ISSUER_ONLY, ENDPOINTS_TOO)
AssertionAudience = Literal["issuer", "issuer-or-endpoint"]


class ConfigError(ValueError):
    """Configuration values that are missing or malformed: one line each, naming the
    variable (`problems`; the message is those lines)."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path(".data")
    database_url: str | None = None
    smtp_host: str | None = None
    smtp_port: int = 25
    mail_from: str = "tollgate@localhost"
    smtp_username: str | None = None
    # Out of repr: settings end up in tracebacks and debug output.
    smtp_password: str | None = field(default=None, repr=False)
    smtp_tls: SmtpTls = "none"
    smtp_tls_verify: bool = True
    smtp_ca_file: Path | None = None  # trusted on top of the system's CAs
    trusted_proxies: tuple[IPNetwork, ...] = ()
    upstream_url: str | None = None
    # the most a request body sent through the gateway may hold: read whole before the
    # upstream is asked (see service/web/gateway.py)
    gateway_max_body: int = 1024 * 1024
    # seconds the gateway waits for the upstream to say anything (the next piece of an
    # answer included); past it, 504
    upstream_timeout: float = 60.0
    public_url: str | None = None  # the issuer (RFC 8414); unset: the address served on
    permissions_file: Path | None = None
    routes_file: Path | None = None
    log_format: str = "json"
    log_level: str = "info"
    # Projections run inside `tollgate serve` unless ops run them as their own process.
    run_projections: bool = True
    pool_size: int = 10
    projection_batch_size: int = 5000
    # Seconds between snapshots of the in-memory models (projections/snapshots.py), written
    # where the projections run; 0: none (every start applies the whole log).
    model_snapshot_every: int = 300
    # Violation emails: each failing one is retried on its own, waiting at most
    # notify_retry_max seconds between attempts, and given up (recorded) once it has been
    # failing for notify_give_up_after seconds.
    notify_retry_max: int = 60
    notify_give_up_after: int = 24 * 3600
    # The token endpoint's bounds: a repeat of the refresh token spent last gets a new pair
    # within refresh_reuse_grace seconds instead of revoking the grant (0: never); a
    # client_credentials application keeps at most cc_token_limit live tokens, the oldest
    # superseded (0: no limit); and asks for at most token_rate_per_client of them a second
    # after a burst of token_rate_burst, all processes together (0: no limit).
    refresh_reuse_grace: int = 10
    cc_token_limit: int = 1000
    token_rate_per_client: int = 20
    token_rate_burst: int = 100
    # The widest IP allow-list entry a client_credentials application may have: a /0 or a
    # /1 would satisfy "an allow list is required" while allowing the whole internet.
    allowlist_min_prefix_v4: int = 8
    allowlist_min_prefix_v6: int = 32
    # When set, GET /metrics needs `Authorization: Bearer <metrics_token>`.
    metrics_token: str | None = field(default=None, repr=False)
    # Faults (seconds): each wait on the database (for a connection, for a statement, for
    # an append to commit) and connecting to it at start; reading one request's headers and
    # body; and the connections one process holds at once.
    db_timeout: float = 5.0
    db_connect_timeout: float = 10.0
    # How stale this process's in-memory view of the log may be when it checks an access
    # token (the gateway, /policy/check, introspection), in seconds: past it the view is
    # read up to date first, and a process that cannot read the log answers 503 instead
    # of honouring tokens revoked elsewhere meanwhile. 0: no bound.
    policy_max_staleness: float = 10.0
    # What a private_key_jwt client assertion's aud may be: "issuer", the issuer alone
    # (draft-ietf-oauth-rfc7523bis, FAPI 2.0), or "issuer-or-endpoint", also the token
    # endpoint's URL, for clients that still sign that (open to audience injection).
    assertion_audience: AssertionAudience = "issuer"
    # /readyz: how far behind the log a SQL projection may be while the process is ready,
    # as the age of the oldest event it has not applied (seconds), and as a count of events
    # (0: not counted; a count grows with the log's rate, an age does not). The age's
    # default outlasts the projections' handover between hosts (ReadinessPolicy).
    ready_max_lag: float = 60.0
    ready_max_lag_events: int = 0
    body_timeout: float = 15.0
    max_connections: int = 2000
    # Security alerts with nothing to revoke (an IP violation at the token, revocation or
    # introspection endpoint, a rotated-away secret): the first per application and address
    # in each window of this many seconds is recorded and mailed, the rest are counted.
    violation_window: int = 900
    # DPoP server nonces (RFC 9449 §8, §9): "required" makes every DPoP proof, at the token
    # endpoint, the gateway and /policy/check, carry a nonce Tollgate handed out (DPoP-Nonce),
    # accepted by every process for dpop_nonce_lifetime seconds.
    dpop_nonce: DpopNonce = "off"
    dpop_nonce_lifetime: int = 300
    extra: Mapping[str, str] = field(default_factory=dict)

    @functools.cached_property  # read on every token request; settings never change
    def issuer(self) -> str:
        """The authorization server's identifier (RFC 8414 §2): PUBLIC_URL, or the address
        the service listens on. Never the request's Host header, which the caller writes."""
        if self.public_url:
            return self.public_url
        wildcard = ipaddress.ip_address(self.host).is_unspecified if _is_ip(self.host) else False
        host = "localhost" if wildcard else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @property
    def pg_dir(self) -> Path:
        return self.data_dir / "postgres"


def _int(
    env: Mapping[str, str], name: str, default: int, low: int = 1, high: int = 2**31 - 1
) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be from {low} to {high}, got {value}")
    return value


def _networks(raw: str, name: str) -> tuple[IPNetwork, ...]:
    nets: list[IPNetwork] = []
    for item in raw.replace(",", " ").split():
        try:
            # read as the addresses it is compared with: an IPv4-mapped one as IPv4
            nets.append(unmapped(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not an IP address or CIDR range") from None
    return tuple(nets)


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


_T = TypeVar("_T")


class _Reader:
    """Reads variables and keeps every problem, so that all of them are reported at once."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def checked(self, parse: Callable[[Mapping[str, str]], _T], fallback: _T) -> _T:
        try:
            return parse(self.env)
        except ConfigError as exc:
            self.problems.extend(exc.problems)
            return fallback

    def number(self, name: str, default: int, low: int = 1, high: int = 2**31 - 1) -> int:
        return self.checked(lambda env: _int(env, name, default, low, high), default)

    def flag(self, name: str, default: bool) -> bool:
        return self.checked(lambda env: _bool(env, name, default), default)


def load_settings(env: Mapping[str, str] | None = None, *, dotenv: bool = True) -> Settings:
    """Read settings from `env` (default: the process environment plus `.env`). Every value
    and file is checked now, and every problem reported at once (ConfigError.problems)."""
    if env is None:
        if dotenv:
            from dotenv import dotenv_values

            file_values = {k: v for k, v in dotenv_values(".env").items() if v is not None}
            env = {**file_values, **os.environ}
        else:
            env = dict(os.environ)
    r = _Reader(env)
    smtp = r.checked(_smtp, _Smtp(None, None, "none", None))
    retry_max, give_up_after = r.checked(_notify, (60, 24 * 3600))
    r.checked(_check_files, None)
    settings = Settings(
        host=env.get("HOST") or "127.0.0.1",
        port=r.number("PORT", 8080, 1, 65535),
        data_dir=r.checked(_data_dir, Path(".data")),
        database_url=r.checked(_database_url, None),
        smtp_host=env.get("SMTP_HOST") or None,
        smtp_port=r.number("SMTP_PORT", _SMTP_PORTS[smtp.tls], 1, 65535),
        mail_from=r.checked(_mail_from, "tollgate@localhost"),
        smtp_username=smtp.username,
        smtp_password=smtp.password,
        smtp_tls=smtp.tls,
        smtp_tls_verify=r.flag("SMTP_TLS_VERIFY", True),
        smtp_ca_file=smtp.ca_file,
        trusted_proxies=r.checked(
            lambda e: _networks(e.get("TRUSTED_PROXIES", ""), "TRUSTED_PROXIES"), ()
        ),
        upstream_url=r.checked(lambda e: _http_url(e, "UPSTREAM_URL"), None),
        gateway_max_body=r.number("GATEWAY_MAX_BODY", 1024 * 1024, 0, 1024**3),
        upstream_timeout=float(r.number("UPSTREAM_TIMEOUT", 60, 1, 3600)),
        public_url=r.checked(lambda e: _http_url(e, "PUBLIC_URL", public=True), None),
        permissions_file=_path(env, "PERMISSIONS_FILE"),
        routes_file=_path(env, "ROUTES_FILE"),
        log_format=r.checked(_log_format, "json"),
        log_level=r.checked(_log_level, "info"),
        run_projections=r.flag("RUN_PROJECTIONS", True),
        # two at least: the writer keeps one, requests and readers need another
        pool_size=r.number("DB_POOL_SIZE", 10, 2, 1000),
        projection_batch_size=r.number("PROJECTION_BATCH_SIZE", 5000, 1, 1_000_000),
        model_snapshot_every=r.number("MODEL_SNAPSHOT_EVERY", 300, 0, 7 * 24 * 3600),
        notify_retry_max=retry_max,
        notify_give_up_after=give_up_after,
        refresh_reuse_grace=r.number("REFRESH_REUSE_GRACE", 10, 0, 300),
        cc_token_limit=r.number("CC_TOKEN_LIMIT", 1000, 0, 10_000_000),
        token_rate_per_client=r.number("TOKEN_RATE_PER_CLIENT", 20, 0, 1_000_000),
        token_rate_burst=r.number("TOKEN_RATE_BURST", 100, 1, 1_000_000),
        allowlist_min_prefix_v4=r.number("ALLOWLIST_MIN_PREFIX_V4", 8, 0, 32),
        allowlist_min_prefix_v6=r.number("ALLOWLIST_MIN_PREFIX_V6", 32, 0, 128),
        metrics_token=r.checked(_metrics_token, None),
        db_timeout=float(r.number("DB_TIMEOUT", 5, 1, 3600)),
        db_connect_timeout=float(r.number("DB_CONNECT_TIMEOUT", 10, 1, 3600)),
        policy_max_staleness=float(r.number("POLICY_MAX_STALENESS", 10, 0, 3600)),
        assertion_audience=r.checked(_assertion_audience, "issuer"),
        ready_max_lag=float(r.number("READY_MAX_LAG", 60, 1, 3600)),
        ready_max_lag_events=r.number("READY_MAX_LAG_EVENTS", 0, 0, 2**31 - 1),
        body_timeout=float(r.number("BODY_TIMEOUT", 15, 1, 3600)),
        max_connections=r.number("MAX_CONNECTIONS", 2000, 1, 1_000_000),
        violation_window=r.number("VIOLATION_WINDOW", 900, 1, 7 * 24 * 3600),
        dpop_nonce=r.checked(_dpop_nonce, "off"),
        dpop_nonce_lifetime=r.number("DPOP_NONCE_LIFETIME", 300, 1, 24 * 3600),
    )
    if r.problems:
        raise ConfigError(*r.problems)
    return settings


def _notify(env: Mapping[str, str]) -> tuple[int, int]:
    """NOTIFY_RETRY_MAX and NOTIFY_GIVE_UP_AFTER, in seconds. Giving up sooner than the
    longest wait between two tries is refused: it says the two values were swapped."""
    retry_max = _int(env, "NOTIFY_RETRY_MAX", 60, 1, 24 * 3600)
    give_up_after = _int(env, "NOTIFY_GIVE_UP_AFTER", 24 * 3600, 1, 365 * 24 * 3600)
    if give_up_after < retry_max:
        raise ConfigError(
            f"NOTIFY_GIVE_UP_AFTER ({give_up_after}) must be at least "
            f"NOTIFY_RETRY_MAX ({retry_max})"
        )
    return retry_max, give_up_after


# The ports that providers use for each mode (RFC 8314 §3.3 for implicit TLS, RFC 6409
# submission for STARTTLS), so that SMTP_TLS=tls alone does not talk TLS to port 25.
_SMTP_PORTS: dict[SmtpTls, int] = {"tls": 465, "starttls": 587, "none": 25}


@dataclass(frozen=True)
class _Smtp:
    username: str | None
    password: str | None = field(repr=False)
    tls: SmtpTls
    ca_file: Path | None


def _smtp(env: Mapping[str, str]) -> _Smtp:
    """The provider's credentials and TLS mode, checked together: no combination that
    would send the password in clear or could never log in."""
    username = env.get("SMTP_USERNAME") or None
    password = env.get("SMTP_PASSWORD") or None
    raw_tls = (env.get("SMTP_TLS") or "").lower() or ("starttls" if username else "none")
    modes: tuple[SmtpTls, ...] = get_args(SmtpTls)
    if raw_tls not in modes:
        raise ConfigError(f"SMTP_TLS must be one of {', '.join(modes)}, got {raw_tls!r}")
    tls = modes[modes.index(raw_tls)]
    if password and not username:
        raise ConfigError("SMTP_PASSWORD is set but SMTP_USERNAME is not")
    if username and not password:
        raise ConfigError("SMTP_USERNAME is set but SMTP_PASSWORD is not")
    if username and tls == "none":
        # Refused rather than warned about: a warning scrolls by, the password is out.
        raise ConfigError("SMTP_TLS=none would send SMTP_PASSWORD in clear: use starttls or tls")
    raw_ca = env.get("SMTP_CA_FILE")
    ca_file = Path(raw_ca) if raw_ca else None
    if ca_file is not None:
        _check_ca_file(ca_file)
    return _Smtp(username, password, tls, ca_file)


def _check_ca_file(path: Path) -> None:
    """Load the bundle once now, so a wrong path is a start-up error, not a failure on the
    first violation's email hours later."""
    try:
        ssl.create_default_context(cafile=str(path))
    except OSError as exc:  # ssl.SSLError is an OSError too: not PEM, no certificate
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise ConfigError(f"SMTP_CA_FILE: cannot load {str(path)!r}: {reason}") from None


def _one_of(env: Mapping[str, str], name: str, modes: tuple[str, ...]) -> str:
    """A setting that names one of `modes` (the first: its default), in any case."""
    raw = (env.get(name) or modes[0]).lower()
    if raw not in modes:
        raise ConfigError(f"{name} must be one of {', '.join(modes)}, got {raw!r}")
    return raw


def _assertion_audience(env: Mapping[str, str]) -> AssertionAudience:
    return cast(AssertionAudience, _one_of(env, "ASSERTION_AUDIENCE", get_args(AssertionAudience)))


def _dpop_nonce(env: Mapping[str, str]) -> DpopNonce:
    return cast(DpopNonce, _one_of(env, "DPOP_NONCE", get_args(DpopNonce)))


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(env: Mapping[str, str]) -> str:
    level = (env.get("LOG_LEVEL") or "info").lower()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {level!r}")
    return level


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --- checked at start: what would otherwise fail on first use ---------------------------


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name)
    return Path(raw) if raw else None


def _data_dir(env: Mapping[str, str]) -> Path:
    """A folder the service can write in, or make, when it will: for the embedded server
    (no DATABASE_URL) or the mail drop (no SMTP_HOST), where it was found unusable only at
    the first violation's email. With both set, a read-only DATA_DIR serves as before
    (`serve --workers` says so itself if it cannot keep its lock and metrics there)."""
    path = Path(env.get("DATA_DIR") or ".data")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"DATA_DIR {str(path)!r} is not a directory")
    if env.get("DATABASE_URL") and env.get("SMTP_HOST"):
        return path
    existing = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
    if existing is None or not _writable(existing):
        where = "" if existing == path else f" (nor can it be made in {str(existing)!r})"
        raise ConfigError(f"DATA_DIR {str(path)!r} is not a folder this user can write in{where}")
    return path


def _writable(folder: Path) -> bool:
    """Whether a folder can be made in `folder`, tried (permissions alone say nothing to
    root, nor of /proc or a read-only mount); what is made is removed at once."""
    try:
        tempfile.TemporaryDirectory(dir=folder, prefix=".tollgate-check-").cleanup()
    except OSError:
        return False
    return True


def _log_format(env: Mapping[str, str]) -> str:
    log_format = env.get("LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    if log_format not in {"console", "json"}:
        raise ConfigError(f"LOG_FORMAT must be console or json, got {log_format!r}")
    return log_format


def _check_files(env: Mapping[str, str]) -> None:
    """Load PERMISSIONS_FILE and ROUTES_FILE as the service will, so that a wrong file is
    one line now rather than a traceback from `create_app`."""
    try:
        catalogue = load_catalogue(_path(env, "PERMISSIONS_FILE"))
    except CatalogueError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    try:
        load_routes(_path(env, "ROUTES_FILE"), catalogue)
    except RoutesError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def _database_url(env: Mapping[str, str]) -> str | None:
    raw = env.get("DATABASE_URL") or None
    if raw is not None and raw.partition("://")[0] not in ("postgresql", "postgres"):
        # not quoted: the value may hold a password
        raise ConfigError("DATABASE_URL must be postgresql://user:password@host:5432/name")
    return raw


def _mail_from(env: Mapping[str, str]) -> str:
    raw = env.get("MAIL_FROM") or "tollgate@localhost"
    name, address = email.utils.parseaddr(raw)
    local, _, domain = address.rpartition("@")
    if not local or not domain or any(c in raw for c in "\r\n"):
        raise ConfigError(f"MAIL_FROM must be an email address (alerts@example.com), got {raw!r}")
    if raw.isascii():
        return raw
    # An IDN domain goes in its ASCII form (xn--, RFC 5890): as typed, it made the From
    # header "alerts@=?utf-8?q?b=C3=BCcher?=.example" and the envelope sender something
    # only an SMTPUTF8 server takes. A local part in other scripts has no ASCII form. A
    # display name in another script is an encoded word (RFC 2047); as typed, it went out
    # as raw 8-bit bytes.
    if not local.isascii():
        raise ConfigError(
            f"MAIL_FROM: the part before the @ must be ASCII (few mail servers take others), "
            f"got {raw!r}"
        )
    if not domain.isascii():
        import idna  # email-validator's own (IDNA 2008, UTS 46)

        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ConfigError(f"MAIL_FROM's domain is not a domain ({exc}), got {raw!r}") from None
    address = f"{local}@{domain}"
    return email.utils.formataddr((name, address)) if name else address


def _http_url(env: Mapping[str, str], name: str, *, public: bool = False) -> str | None:
    """An absolute http(s) URL with a host and no query or fragment (the service appends
    paths to it). PUBLIC_URL is published in the metadata: no user or password in it."""
    raw = env.get(name) or ""
    if not raw:
        return None
    shown = mask_url(raw)
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 -- a port that is not a number raises here
    except ValueError as exc:
        raise ConfigError(f"{name} is not a URL ({exc}): {shown!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or re.search(r"\s", raw):
        raise ConfigError(f"{name} must be an http:// or https:// URL with a host, got {shown!r}")
    if "?" in raw or "#" in raw:
        raise ConfigError(f"{name} must have no query or fragment, got {shown!r}")
    if public and "@" in parts.netloc:
        raise ConfigError(f"{name} must not hold a user or password (it is published)")
    # Scheme and host in lower case (RFC 3986 §6.2.2.1): the issuer is compared as a string
    # (RFC 8414 §3.3, RFC 9207), and "HTTPS://" must mean https to the cookies' Secure flag.
    netloc = parts.netloc if "@" in parts.netloc else parts.netloc.lower()
    return urlunsplit(parts._replace(scheme=parts.scheme.lower(), netloc=netloc)).rstrip("/")


def _metrics_token(env: Mapping[str, str]) -> str | None:
    raw = env.get("METRICS_TOKEN") or None
    if raw is not None and (len(raw) < 16 or not all("!" <= c <= "~" for c in raw)):
        # never quoted: it is a secret
        raise ConfigError(
            "METRICS_TOKEN must be 16 or more visible ASCII characters (openssl rand -hex 32)"
        )
    return raw


MASK = "********"


def mask_url(text: str) -> str:
    """`text` with the passwords of a URL in it replaced by MASK: the user's (everything
    between its first `:` and the last `@`, a `/` or `?` left unencoded in it included)
    and the `password` and `sslpassword` parameters. Where an `@` in the query makes the
    user's part unclear, more is masked, never less."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    user, at, after = rest.rpartition("@")
    if at and ":" in user:
        rest = f"{user.partition(':')[0]}:{MASK}@{after}"
    return scheme + sep + _PASSWORD_PARAMETER.sub(rf"\g<1>{MASK}", rest)


_PASSWORD_PARAMETER = re.compile(r"(?i)((?:^|[?&;])(?:ssl)?password=)[^&#]*")


def url_has_password(text: str) -> bool:
    """Whether `text`, a URL, holds a password (of its user, or a parameter): what to keep
    out of an error message that may quote the URL's pieces."""
    return mask_url(text) != text
