"""Frozen settings read from the environment (and an optional `.env`), never at import."""

from __future__ import annotations

import ipaddress
import os
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SmtpTls = Literal["starttls", "tls", "none"]


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


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
    public_url: str | None = None  # the issuer (RFC 8414); unset: the address served on
    permissions_file: Path | None = None
    routes_file: Path | None = None
    log_format: str = "json"
    log_level: str = "info"
    # Projections run inside `tollgate serve` unless ops run them as their own process.
    run_projections: bool = True
    pool_size: int = 10
    projection_batch_size: int = 5000
    # Violation emails: each failing one is retried on its own, waiting at most
    # notify_retry_max seconds between attempts, and given up (recorded) once it has been
    # failing for notify_give_up_after seconds.
    notify_retry_max: int = 60
    notify_give_up_after: int = 24 * 3600
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
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
            nets.append(ipaddress.ip_network(item, strict=False))
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


def load_settings(env: Mapping[str, str] | None = None, *, dotenv: bool = True) -> Settings:
    """Read settings from `env` (default: the process environment plus `.env`)."""
    if env is None:
        if dotenv:
            from dotenv import dotenv_values

            file_values = {k: v for k, v in dotenv_values(".env").items() if v is not None}
            env = {**file_values, **os.environ}
        else:
            env = dict(os.environ)
    default_format = "console" if sys.stderr.isatty() else "json"
    log_format = env.get("LOG_FORMAT") or default_format
    if log_format not in {"console", "json"}:
        raise ConfigError(f"LOG_FORMAT must be console or json, got {log_format!r}")
    permissions_file = env.get("PERMISSIONS_FILE")
    routes_file = env.get("ROUTES_FILE")
    smtp = _smtp(env)
    retry_max, give_up_after = _notify(env)
    return Settings(
        host=env.get("HOST") or "127.0.0.1",
        port=_int(env, "PORT", 8080, 1, 65535),
        data_dir=Path(env.get("DATA_DIR") or ".data"),
        database_url=env.get("DATABASE_URL") or None,
        smtp_host=env.get("SMTP_HOST") or None,
        smtp_port=_int(env, "SMTP_PORT", _SMTP_PORTS[smtp.tls], 1, 65535),
        mail_from=env.get("MAIL_FROM") or "tollgate@localhost",
        smtp_username=smtp.username,
        smtp_password=smtp.password,
        smtp_tls=smtp.tls,
        smtp_tls_verify=_bool(env, "SMTP_TLS_VERIFY", True),
        smtp_ca_file=smtp.ca_file,
        trusted_proxies=_networks(env.get("TRUSTED_PROXIES", ""), "TRUSTED_PROXIES"),
        upstream_url=env.get("UPSTREAM_URL") or None,
        public_url=(env.get("PUBLIC_URL") or "").rstrip("/") or None,
        permissions_file=Path(permissions_file) if permissions_file else None,
        routes_file=Path(routes_file) if routes_file else None,
        log_format=log_format,
        log_level=_log_level(env),
        run_projections=_bool(env, "RUN_PROJECTIONS", True),
        # two at least: the writer keeps one, requests and readers need another
        pool_size=_int(env, "DB_POOL_SIZE", 10, 2, 1000),
        projection_batch_size=_int(env, "PROJECTION_BATCH_SIZE", 5000, 1, 1_000_000),
        notify_retry_max=retry_max,
        notify_give_up_after=give_up_after,
    )


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
