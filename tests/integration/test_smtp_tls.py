"""Mail providers: STARTTLS or implicit TLS with a login, against a real aiosmtpd server on
loopback with a certificate made here. A refused login or a certificate that does not
verify is our configuration, not the recipient's: logged as such, retried, never lost,
never sent in clear."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email
import email.policy
import socket
import ssl
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from service import events as ev
from service.notification.notifier import Notifier, failures_stream, notification_stream
from service.settings import Settings
from tests.integration.test_notifier import (
    add_app,
    context,
    notifier,
    running,
    violate,
    wait_for_stream,
)

USERNAME = "alerts@acme.example"
PASSWORD = "correct-horse-battery-staple"
WRONG = "wrong-Tr0ub4dor&3-password"


@dataclasses.dataclass
class Seen:
    """What the server saw of one delivered message."""

    tls: str | None  # the TLS version, None in clear
    login: str | None
    message: EmailMessage


class Provider:
    """An aiosmtpd handler and authenticator that behaves like a mail provider: it takes
    a login only over TLS and only with the right password, and keeps what it saw (it runs
    on the server's thread)."""

    def __init__(self) -> None:
        self.password = PASSWORD
        #: a careless server that quotes the password it refused: as typed (True), or as
        #: AUTH PLAIN sent it ("plain": base64 of NUL, login, NUL, password)
        self.echo: bool | str = False
        self.logins: list[tuple[str, bool]] = []  # (username, over TLS) of every attempt
        self.received: list[Seen] = []

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        over_tls = _tls_version(server) is not None
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        self.logins.append((login, over_tls))
        ok = over_tls and login == USERNAME and password == self.password
        quoted = password
        if self.echo == "plain":
            quoted = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        echoed = f"535 5.7.8 {quoted} is not the password of {login}" if self.echo else None
        return AuthResult(
            success=ok,
            handled=False,
            auth_data=login if ok else None,
            message=None if ok else echoed,
        )

    async def handle_DATA(self, server, session, envelope) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        login = session.auth_data if session.authenticated else None
        self.received.append(Seen(_tls_version(server), login, message))
        return "250 Message accepted for delivery"


def _tls_version(server) -> str | None:
    ssl_object = server.transport.get_extra_info("ssl_object")
    return ssl_object.version() if ssl_object is not None else None


class QuietController(Controller):
    def factory(self):
        # Implicit TLS is invisible to aiosmtpd's auth_require_tls (it only knows about
        # STARTTLS), so the authenticator checks TLS itself; silence the warning that
        # "requiring AUTH while not requiring TLS" would otherwise print.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return super().factory()


class ProviderServer:
    """mode: "starttls" (TLS after STARTTLS, required before AUTH), "tls" (implicit TLS
    from the first byte), or "plain" (no TLS offered at all)."""

    def __init__(self, mode: str, cert: trustme.LeafCert) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.provider = Provider()
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(tls)
        options: dict[str, Any] = {
            "hostname": "127.0.0.1",
            "port": self.port,
            "authenticator": self.provider.authenticate,
            "auth_required": True,
        }
        if mode == "starttls":
            options.update(tls_context=tls, require_starttls=True, auth_require_tls=True)
        elif mode == "tls":
            options.update(ssl_context=tls, auth_require_tls=False)
        else:
            options.update(auth_require_tls=False)
        self._controller = QuietController(self.provider, **options)

    async def start(self) -> None:
        await asyncio.to_thread(self._controller.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self._controller.stop)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@asynccontextmanager
async def provider(mode: str, ca: trustme.CA) -> AsyncIterator[ProviderServer]:
    server = ProviderServer(mode, ca.issue_cert("127.0.0.1", "localhost"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def provider_settings(tmp_path: Path, server: ProviderServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "smtp_host": "127.0.0.1",
        "smtp_port": server.port,
        "mail_from": "tollgate@alerts.example",
        "smtp_username": USERNAME,
        "smtp_password": PASSWORD,
        "smtp_tls": "starttls",
    }
    return Settings(**(values | overrides))


def small_refusal_limit(worker: Notifier) -> Notifier:
    worker.max_refusals = 2  # a 5xx counted as a refusal would be given up after two
    return worker


async def all_events_text(db) -> str:
    rows = await db.pool.fetch("SELECT payload::text, metadata::text FROM events")
    return "\n".join(f"{payload}\n{metadata}" for payload, metadata in rows)


# --- delivery --------------------------------------------------------------------------


async def test_starttls_with_login_delivers_over_tls_as_the_configured_user(
    db, tmp_path, ca, ca_file
):
    async with provider("starttls", ca) as server:
        settings = provider_settings(tmp_path, server, smtp_ca_file=ca_file)
        async with context(db, settings) as ctx:
            await add_app(ctx)
            position = await violate(ctx)
            with structlog.testing.capture_logs() as logs:
                async with running(notifier(ctx, db)):
                    [sent] = await wait_for_stream(ctx, notification_stream(position))

    assert isinstance(sent.event, ev.ViolationNotificationSent)
    [seen] = server.provider.received
    assert seen.tls is not None and seen.tls.startswith("TLS")
    assert seen.login == USERNAME
    assert server.provider.logins == [(USERNAME, True)]  # never tried in clear
    assert "Billing sync" in seen.message["Subject"]
    assert not any(PASSWORD in str(entry) for entry in logs)
    assert PASSWORD not in await all_events_text(db)


async def test_implicit_tls_delivers_from_the_first_byte(db, tmp_path, ca, ca_file):
    async with provider("tls", ca) as server:
        settings = provider_settings(tmp_path, server, smtp_tls="tls", smtp_ca_file=ca_file)
        async with context(db, settings) as ctx:
            await add_app(ctx)
            position = await violate(ctx)
            async with running(notifier(ctx, db)):
                [sent] = await wait_for_stream(ctx, notification_stream(position))

    assert isinstance(sent.event, ev.ViolationNotificationSent)
    [seen] = server.provider.received
    assert seen.tls is not None and seen.login == USERNAME


# --- a wrong password ------------------------------------------------------------------


async def test_a_refused_login_is_logged_retried_and_delivered_once_fixed(
    db, tmp_path, ca, ca_file
):
    async with provider("starttls", ca) as server:
        wrong = provider_settings(tmp_path, server, smtp_password=WRONG, smtp_ca_file=ca_file)
        async with context(db, wrong) as ctx:
            await add_app(ctx)
            position = await violate(ctx)
            with structlog.testing.capture_logs() as logs:
                async with running(small_refusal_limit(notifier(ctx, db))):
                    # more attempts than max_refusals: a recipient refusal would be given up
                    failures = await wait_for_stream(ctx, failures_stream(position), count=4)
                    assert await ctx.eventlog.read_stream(notification_stream(position)) == []
            assert await ctx.eventlog.read_stream(notification_stream(position)) == []

        # The operator fixes SMTP_PASSWORD and restarts: the same email goes out.
        fixed = dataclasses.replace(wrong, smtp_password=PASSWORD)
        async with context(db, fixed) as ctx, running(notifier(ctx, db)):
            [sent] = await wait_for_stream(ctx, notification_stream(position))

    assert isinstance(sent.event, ev.ViolationNotificationSent)
    [seen] = server.provider.received
    assert seen.login == USERNAME and seen.tls is not None

    first = failures[0].event
    assert isinstance(first, ev.ViolationNotificationFailed)
    assert "535" in first.error
    auth_lines = [e for e in logs if e["event"] == "notifier.smtp_auth_failed"]
    assert auth_lines, [e["event"] for e in logs]
    line = auth_lines[0]
    assert line["log_level"] == "error"
    assert (line["host"], line["port"], line["username"]) == ("127.0.0.1", server.port, USERNAME)
    assert "535" in line["error"]
    # one line per attempt, not a warning besides it
    assert not [e for e in logs if e["event"] == "notifier.send_failed"]
    assert not [e for e in logs if e["event"] == "notifier.abandoned"]
    assert not any(WRONG in str(entry) for entry in logs)
    assert WRONG not in await all_events_text(db)


@pytest.mark.parametrize("echo", [True, "plain"], ids=["as-typed", "as-auth-plain-sent-it"])
async def test_a_password_that_the_server_quotes_back_is_not_stored_or_logged(
    db, tmp_path, ca, ca_file, echo
):
    async with provider("starttls", ca) as server:
        server.provider.echo = echo
        wrong = provider_settings(tmp_path, server, smtp_password=WRONG, smtp_ca_file=ca_file)
        async with context(db, wrong) as ctx:
            await add_app(ctx)
            position = await violate(ctx)
            with structlog.testing.capture_logs() as logs:
                async with running(notifier(ctx, db)):
                    [failure, *_] = await wait_for_stream(ctx, failures_stream(position))

    assert "[redacted] is not the password of" in failure.event.error
    assert any(e["event"] == "notifier.smtp_auth_failed" for e in logs)
    plain = base64.b64encode(f"\0{USERNAME}\0{WRONG}".encode()).decode()
    for secret in (WRONG, plain):
        assert not any(secret in str(entry) for entry in logs)
        assert secret not in await all_events_text(db)


async def test_a_login_accepted_again_at_the_provider_delivers_the_waiting_email(
    db, tmp_path, ca, ca_file
):
    async with provider("starttls", ca) as server:
        server.provider.password = "rotated-at-the-provider"
        settings = provider_settings(tmp_path, server, smtp_ca_file=ca_file)
        async with context(db, settings) as ctx:
            await add_app(ctx)
            position = await violate(ctx)
            async with running(small_refusal_limit(notifier(ctx, db))):
                await wait_for_stream(ctx, failures_stream(position), count=3)
                server.provider.password = PASSWORD
                [sent] = await wait_for_stream(ctx, notification_stream(position))

    assert isinstance(sent.event, ev.ViolationNotificationSent)
    assert len(server.provider.received) == 1


# --- certificates ----------------------------------------------------------------------


async def test_an_unknown_ca_is_refused_and_retried_never_sent_in_clear(db, tmp_path, ca):
    async with provider("starttls", ca) as server:
        settings = provider_settings(tmp_path, server)  # the test CA is not trusted
        async with context(db, settings) as ctx:
            await add_app(ctx)
            position = await violate(ctx)
            with structlog.testing.capture_logs() as logs:
                async with running(small_refusal_limit(notifier(ctx, db))):
                    failures = await wait_for_stream(ctx, failures_stream(position), count=3)
            assert await ctx.eventlog.read_stream(notification_stream(position)) == []

    assert server.provider.received == []
    assert server.provider.logins == []  # the password never left
    assert "certificate" in failures[0].event.error
    [line, *_] = [e for e in logs if e["event"] == "notifier.smtp_tls_failed"]
    assert line["log_level"] == "error"
    assert (line["host"], line["tls"], line["verify"]) == ("127.0.0.1", "starttls", True)
    assert "certificate not trusted" in line["error"]


async def test_implicit_tls_with_an_unknown_ca_is_refused(db, tmp_path, ca):
    async with provider("tls", ca) as server:
        settings = provider_settings(tmp_path, server, smtp_tls="tls")
        async with context(db, settings) as ctx:
            await add_app(ctx)
            position = await violate(ctx)
            with structlog.testing.capture_logs() as logs:
                async with running(small_refusal_limit(notifier(ctx, db))):
                    await wait_for_stream(ctx, failures_stream(position), count=3)
            assert await ctx.eventlog.read_stream(notification_stream(position)) == []

    assert server.provider.received == [] and server.provider.logins == []
    assert any(e["event"] == "notifier.smtp_tls_failed" for e in logs)


async def test_verification_off_delivers_to_an_unknown_ca_over_tls(db, tmp_path, ca):
    async with provider("starttls", ca) as server:
        settings = provider_settings(tmp_path, server, smtp_tls_verify=False)
        async with context(db, settings) as ctx:
            await add_app(ctx)
            position = await violate(ctx)
            with structlog.testing.capture_logs() as logs:
                async with running(notifier(ctx, db)):
                    [sent] = await wait_for_stream(ctx, notification_stream(position))

    assert isinstance(sent.event, ev.ViolationNotificationSent)
    [seen] = server.provider.received
    assert seen.tls is not None and seen.login == USERNAME
    [warning] = [e for e in logs if e["event"] == "notifier.smtp_tls_unverified"]
    assert warning["log_level"] == "warning" and warning["host"] == "127.0.0.1"


async def test_a_server_without_starttls_gets_no_login_and_no_email(db, tmp_path, ca, ca_file):
    """What a STARTTLS-stripping attacker looks like: required TLS means the email waits."""
    async with provider("plain", ca) as server:
        settings = provider_settings(tmp_path, server, smtp_ca_file=ca_file)
        async with context(db, settings) as ctx:
            await add_app(ctx)
            position = await violate(ctx)
            with structlog.testing.capture_logs() as logs:
                async with running(small_refusal_limit(notifier(ctx, db))):
                    failures = await wait_for_stream(ctx, failures_stream(position), count=3)
            assert await ctx.eventlog.read_stream(notification_stream(position)) == []

    assert server.provider.received == [] and server.provider.logins == []
    assert "STARTTLS" in failures[0].event.error
    assert any(e["event"] == "notifier.smtp_tls_failed" for e in logs)
