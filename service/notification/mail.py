"""The violation email: its text and headers, its `.eml` drop, and SMTP failures told
apart (the recipient's refusal, our own configuration, or worth retrying)."""

from __future__ import annotations

import base64
import email.policy
import email.utils
import hashlib
import os
import re
import ssl
import textwrap
import unicodedata
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import msgspec
from email_validator import EmailNotValidError, validate_email

from service.events import IpViolationDetected
from service.notification.coalesced import Earlier
from service.settings import Settings

_ENDPOINTS = {
    "api": (
        "a valid access token was presented to the API gateway",
        "the API gateway (/api/...)",
    ),
    "policy_check": (
        "a resource server asked Tollgate about a valid access token used",
        "the policy check (POST /policy/check)",
    ),
    "token": (
        "valid client credentials were presented at the token endpoint",
        "the token endpoint (POST /oauth/token)",
    ),
    "revoke": (
        "valid client credentials were presented at the revocation endpoint",
        "the revocation endpoint (POST /oauth/revoke)",
    ),
    "introspect": (
        "valid client credentials were presented at the introspection endpoint",
        "the introspection endpoint (POST /oauth/introspect)",
    ),
}


def build_message(
    *,
    position: int,
    violation: IpViolationDetected,
    app_name: str | None,
    recorded_at: datetime,
    recipients: list[str],
    mail_from: str,
    now: datetime | None = None,
    earlier: Earlier | None = None,
    window: int = 0,
) -> EmailMessage:
    """The notification email. It names the application, the address and the time, and
    never carries a token, hash, secret or code. `earlier`: the attempts counted since the
    previous email about this application and address, which this one covers too;
    `window`: VIOLATION_WINDOW, said where later attempts will be counted, not mailed."""
    name = _one_line(app_name) if app_name else "(deleted application)"
    # In a header, "=?...?=" is an encoded word: Python's email package decodes one in a
    # value it is given (and a name could carry CR LF that way), and every mail program
    # decodes it on display. A word joiner after "=" keeps the name as it was typed.
    shown = name.replace("=?", "=\u2060?")
    # The address was checked on the way in, but the log also holds events written before a
    # check existed: nothing from an event reaches a header unfiltered.
    violation = msgspec.structs.replace(
        violation, ip=_one_line(violation.ip), client_id=_one_line(violation.client_id)
    )
    what, where = _ENDPOINTS.get(
        violation.endpoint,
        ("valid credentials were presented", _one_line(violation.endpoint)),
    )
    message = EmailMessage()
    attempts = 1 + (earlier.count if earlier is not None else 0)
    message["Subject"] = (
        f'Tollgate security alert: "{shown}" used from {violation.ip}, outside its IP allow list'
        + (f" ({attempts} attempts)" if attempts > 1 else "")
    )
    message["From"] = mail_from
    message["To"] = _to(recipients)
    message["Date"] = email.utils.format_datetime(now or datetime.now(UTC))
    message["Message-ID"] = message_id(position, violation.client_id, mail_from)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
    message["X-Tollgate-Violation"] = str(position)
    attempted = _attempts(violation, earlier, window)
    body = _body(position, violation, name, recorded_at, what, where, attempted)
    # Plain ASCII goes as is (readable in the .eml file); other text is encoded.
    message.set_content(body, cte="7bit" if body.isascii() else None)
    return message


def _body(
    position: int,
    violation: IpViolationDetected,
    name: str,
    recorded_at: datetime,
    what: str,
    where: str,
    attempts: str,
) -> str:
    if violation.token_revoked:
        outcome = "The access token was revoked: whoever used it must obtain a new one."
    elif violation.endpoint == "token":
        outcome = "The request was refused (403); no token was issued."
    elif violation.endpoint in ("revoke", "introspect"):
        outcome = "The request was refused (403) before the client's token was looked at."
    else:
        outcome = "The request was refused (403); the token was not revoked."
    when = recorded_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    intro = textwrap.fill(
        f"Tollgate refused a request for one of your applications: {what} from "
        f"{violation.ip}, an address outside the application's IP allow list.",
        width=76,
    )
    return f"""\
{intro}

Application:  {name}
Client ID:    {violation.client_id}
IP address:   {violation.ip}
When:         {when}
Endpoint:     {where}
{attempts}

{outcome}

What to do:
- Check where this application's credentials are used, and whether the
  address above is one of your systems.
- If the credentials may have leaked, rotate the client secret now; in the
  admin API:
  POST /admin/applications/{violation.client_id}/rotate-secret
- If the address is legitimate, add it to the application's IP allow list.

Reference: violation {position}. You receive this email because this address is one of
the application's notification addresses.
"""


def _attempts(violation: IpViolationDetected, earlier: Earlier | None, window: int) -> str:
    """The attempts this email covers and, where a flood cannot revoke anything, how later
    ones are reported."""
    line = "Attempts:     1"
    if earlier is not None:
        line = (
            f"Attempts:     {1 + earlier.count}: this one, and {earlier.count} counted since the\n"
            f"              previous email about this address, from {_when(earlier.first_at)}\n"
            f"              to {_when(earlier.last_at)}"
        )
    if violation.token_revoked or window <= 0:
        return line
    every = f"{window // 60} minutes" if window % 60 == 0 else f"{window} seconds"
    later = textwrap.fill(
        f"Later attempts from this address with these credentials are counted, not mailed "
        f"one by one: at most one email per application and address every {every} "
        f"(VIOLATION_WINDOW), and the next one says how many there were. Every count is in "
        f"the event log (IpViolationsCoalesced) and on the dashboard.",
        width=76,
    )
    return f"{line}\n\n{later}"


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def message_id(position: int, client_id: str, mail_from: str) -> str:
    """The same violation always gets the same Message-ID, so a resend is recognisable."""
    domain = email.utils.parseaddr(mail_from)[1].rpartition("@")[2]
    domain = re.sub(r"[^A-Za-z0-9.-]", "", domain) or "tollgate.invalid"
    # A digest of the client_id keeps the header short enough not to be folded.
    client = hashlib.sha256(client_id.encode()).hexdigest()[:16]
    return f"<violation-{position}.{client}@{domain}>"


def smtp_address(address: str) -> str | None:
    """The form an address travels in over SMTP: its domain in ASCII (xn--, RFC 5890);
    None when its local part is not ASCII, which only an SMTPUTF8 server (RFC 6531) takes.
    Addresses recorded before either was checked are taken as they are when ASCII."""
    try:
        return validate_email(address, check_deliverability=False).ascii_email
    except EmailNotValidError:
        return address if address.isascii() else None


def _to(recipients: list[str]) -> str | list[Address]:
    """The To field: each recipient as an address object, so that no value is parsed as
    header text (where "=?...?=" would be decoded); one that cannot be written as an
    address (recorded before addresses were checked) is left out of it, not of the
    envelope."""
    shown = []
    for recipient in recipients:
        local, _, domain = recipient.rpartition("@")
        if "=?" in recipient or not local:
            continue
        try:
            shown.append(Address(username=local, domain=domain))
        except (ValueError, IndexError, TypeError):
            continue
    return shown or "undisclosed-recipients:;"


def _one_line(text: str) -> str:
    """User-supplied text in a header or a body line: no control characters, no newlines."""
    cleaned = "".join(" " if unicodedata.category(c).startswith("C") else c for c in text)
    return " ".join(cleaned.split())


def eml_path(mail_dir: Path, position: int) -> Path:
    # Zero-padded: the files sort by violation position.
    return mail_dir / f"violation-{position:012d}.eml"


def write_eml(settings: Settings, position: int, message: EmailMessage) -> Path:
    """Write the message as an RFC 5322 file; a resend replaces it atomically."""
    settings.mail_dir.mkdir(parents=True, exist_ok=True)
    path = eml_path(settings.mail_dir, position)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(message.as_bytes(policy=email.policy.SMTP))
    os.replace(partial, path)
    return path


async def smtp_send(
    settings: Settings, message: EmailMessage, recipients: list[str], smtp_timeout: float
) -> dict[str, aiosmtplib.SMTPResponse]:
    """Hand the message to the mail server; return the recipients it refused."""
    assert settings.smtp_host is not None
    ca_file = settings.smtp_ca_file
    refused, _reply = await aiosmtplib.send(
        message,
        sender=settings.mail_from,
        recipients=recipients,
        hostname=settings.smtp_host,
        port=settings.smtp_port,
        timeout=smtp_timeout,
        username=settings.smtp_username,
        password=settings.smtp_password,
        use_tls=settings.smtp_tls == "tls",
        # Required, not opportunistic: a server that does not offer STARTTLS is an error,
        # so an attacker who strips it cannot read the login. `none` means none, even when
        # offered: it is the opt-out for a relay whose certificate cannot verify.
        start_tls=settings.smtp_tls == "starttls",
        validate_certs=settings.smtp_tls_verify,
        cert_bundle=str(ca_file) if ca_file is not None else None,
    )
    return refused


class Unsendable(Exception):
    """The message itself cannot be built or encoded: no retry will send it."""


def permanent(exc: BaseException) -> bool:
    """A 5xx answer about this message or its recipients: trying again will not change it.
    Connection errors, timeouts, 4xx answers, and our own failures to log in or to set up
    TLS (see `auth_failed`, `tls_failed`) are transient and retried for as long as it takes."""
    if isinstance(exc, Unsendable):
        return True
    if auth_failed(exc) or tls_failed(exc):
        return False
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(500 <= r.code < 600 for r in exc.recipients)
    return isinstance(exc, aiosmtplib.SMTPResponseException) and 500 <= exc.code < 600


# RFC 4954 §6: authentication required, mechanism too weak, credentials invalid, encryption
# required. Each says something about our settings, nothing about the recipients.
_AUTH_CODES = frozenset({530, 534, 535, 538})


def auth_failed(exc: BaseException) -> bool:
    """The server did not accept our login (or wants one we did not give): fixing
    SMTP_USERNAME/SMTP_PASSWORD sends the email, so it must not be given up."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return True
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code in _AUTH_CODES


def tls_failed(exc: BaseException) -> bool:
    """TLS could not be set up: a certificate that does not verify, a failed handshake, or
    a server that does not offer the STARTTLS we require (which is how a stripping attacker
    looks, so the email waits rather than go out in clear)."""
    if _ssl_error(exc) is not None:
        return True
    return (
        isinstance(exc, aiosmtplib.SMTPException)
        and not isinstance(exc, aiosmtplib.SMTPResponseException)
        # str(), not .message: SMTPRecipientsRefused never sets one
        and "STARTTLS" in str(exc)
    )


def server_side(exc: BaseException) -> bool:
    """The failure says nothing about this message: the server could not be reached, did
    not answer in time, or would not take our login or TLS. Once another email goes
    through, this one will too, so it need not wait out its backoff."""
    return isinstance(exc, OSError) or auth_failed(exc) or tls_failed(exc)


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    # aiosmtplib raises the handshake's error itself after STARTTLS, but wraps it in an
    # SMTPConnectError for implicit TLS: look down the chain.
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def login_secrets(username: str | None, password: str | None) -> tuple[str, ...]:
    """The SMTP password and the forms a login sends it in, for `describe` to cut out: a
    server that quotes what it refused may quote AUTH LOGIN's base64 of the password, or
    AUTH PLAIN's base64 of NUL, user, NUL, password (RFC 4616)."""
    if not password:
        return ()
    user, secret = (username or "").encode(), password.encode()
    return (
        password,
        base64.b64encode(secret).decode(),
        base64.b64encode(b"\0" + user + b"\0" + secret).decode(),
    )


def describe(exc: BaseException, *, secrets: tuple[str | None, ...] = ()) -> str:
    """A short account of a failure for the log and the Failed event. Any of `secrets`
    that a server or library echoed back is cut out: the description is stored for good."""
    tls = _ssl_error(exc)
    if isinstance(tls, ssl.SSLCertVerificationError):
        text = f"TLS: server certificate not trusted: {tls.verify_message}"
    elif tls is not None:
        text = f"TLS: {tls.reason or tls.strerror or type(tls).__name__}"
    elif isinstance(exc, aiosmtplib.SMTPResponseException):
        text = f"SMTP {exc.code}: {exc.message}"
    elif isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = sorted({r.code for r in exc.recipients})
        text = f"SMTP: every recipient refused ({', '.join(map(str, codes))})"
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{type(exc).__name__}: {exc.strerror}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return " ".join(text.split())[:200]
