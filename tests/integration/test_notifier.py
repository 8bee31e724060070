"""IP-violation emails: over a real SMTP server (aiosmtpd on loopback) or as .eml files,
from the real event log; once per violation, at least once across failures and restarts."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from email.message import EmailMessage
from pathlib import Path

import asyncpg
import pytest
import structlog
from aiosmtpd.controller import Controller

from service import events as ev
from service.app import CONTEXT
from service.context import Context
from service.eventlog import EventLogUnavailable
from service.notification.mail import eml_path, message_id
from service.notification.notifier import (
    NAME,
    RETRIES,
    Backoff,
    Notifier,
    failures_stream,
    notification_stream,
    restart_if_rewritten,
)
from service.runtime import open_context
from service.settings import Settings
from service.storage.database import SESSION_CHECK, Database, SessionWatch
from tests.e2e.oauth_helpers import new_app
from tests.factories import companies, cut_tail
from tests.urls import with_short_drop

SECRET_HASH = "5e" * 32
FAMILY = "family-must-not-be-mailed"


# --- a real SMTP server ----------------------------------------------------------------


class Mailbox:
    """aiosmtpd handler: keeps every message it accepts (it runs on the server's thread)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], EmailMessage]] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"

    @property
    def messages(self) -> list[EmailMessage]:
        return [m for _, _, m in self.received]


class SmtpServer:
    def __init__(self) -> None:
        with socket.socket() as probe:  # a port that nothing listens on (yet)
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.mailbox = Mailbox()
        self._controller: Controller | None = None

    async def start(self) -> None:
        self._controller = Controller(self.mailbox, hostname="127.0.0.1", port=self.port)
        await asyncio.to_thread(self._controller.start)

    async def stop(self) -> None:
        if self._controller is not None:
            await asyncio.to_thread(self._controller.stop)
            self._controller = None


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    """Not started: a test starts it (or leaves the port dead)."""
    server = SmtpServer()
    try:
        yield server
    finally:
        await server.stop()


# --- wiring ----------------------------------------------------------------------------


def smtp_settings(tmp_path: Path, smtp: SmtpServer) -> Settings:
    return Settings(
        data_dir=tmp_path,
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        mail_from="tollgate@alerts.example",
    )


@asynccontextmanager
async def context(db, settings: Settings) -> AsyncIterator[Context]:
    async with open_context(settings, database=Database(db.dsn, db.pool)) as ctx:
        ctx.eventlog.poll_interval = 0.05  # other instances' appends do not wake this one
        yield ctx


def notifier(ctx: Context, db) -> Notifier:
    return Notifier(
        ctx,
        dsn=db.dsn,
        backoff=Backoff(base=0.05, cap=0.2),
        standby_interval=0.05,
        poll_interval=0.05,
        smtp_timeout=5,
    )


@asynccontextmanager
async def running(*workers: Notifier) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        for worker in workers:
            await worker.start()
            stack.push_async_callback(worker.close)
        yield


async def add_app(
    ctx: Context,
    client_id: str = "billing-sync",
    *,
    name: str = "Billing sync",
    emails: tuple[str, ...] = ("ops@acme.example", "security@acme.example"),
    company_id: str = "acme",
) -> None:
    created = ev.ApplicationCreated(
        company_id=company_id,
        client_id=client_id,
        name=name,
        grant_type="client_credentials",
        redirect_uri=None,
        ip_allowlist=["192.0.2.0/24"],
        permissions=["invoices:read"],
        notification_emails=list(emails),
        secret_hash=SECRET_HASH,
    )
    await ctx.eventlog.append(f"application-{client_id}", 0, [created])


async def violate(
    ctx: Context,
    client_id: str = "billing-sync",
    *,
    ip: str = "203.0.113.9",
    endpoint: str = "api",
    revoked: bool = True,
    company_id: str = "acme",
) -> int:
    violation = ev.IpViolationDetected(
        company_id=company_id,
        client_id=client_id,
        ip=ip,
        endpoint=endpoint,
        family_id=FAMILY if endpoint != "token" else None,
        token_revoked=revoked,
    )
    [position] = await ctx.eventlog.append(f"violations-{client_id}", None, [violation])
    return position


async def eventually(check: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def wait_for_stream(ctx: Context, stream_id: str, count: int = 1) -> list:
    deadline = time.monotonic() + 10
    while len(events := await ctx.eventlog.read_stream(stream_id)) < count:
        assert time.monotonic() < deadline, f"timed out waiting for {stream_id}"
        await asyncio.sleep(0.02)
    return events


async def checkpoint(db) -> int:
    return await db.pool.fetchval(
        "SELECT position FROM projection_checkpoints WHERE name = $1", NAME
    )


def mid(position: int, client_id: str = "billing-sync") -> str:
    return message_id(position, client_id, "tollgate@alerts.example")


def body_of(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return " ".join(part.get_content().split())  # the text is wrapped for reading


# --- delivery --------------------------------------------------------------------------


async def test_violation_email_arrives_over_smtp_once_with_what_happened(db, tmp_path, smtp):
    await smtp.start()
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        await add_app(ctx)
        api = await violate(ctx, ip="203.0.113.9", endpoint="api", revoked=True)
        token = await violate(ctx, ip="2001:db8::7", endpoint="token", revoked=False)
        worker = notifier(ctx, db)
        with structlog.testing.capture_logs() as logs:
            async with running(worker):
                await eventually(lambda: len(smtp.mailbox.received) >= 2)
                sent_api = await wait_for_stream(ctx, notification_stream(api))
                sent_token = await wait_for_stream(ctx, notification_stream(token))
                await eventually(lambda: worker.position >= token)
                await asyncio.sleep(0.3)  # time enough for a duplicate to show up

    assert len(smtp.mailbox.received) == 2
    (sender, rcpts, first), (_, _, second) = smtp.mailbox.received
    assert sender == "tollgate@alerts.example"
    assert rcpts == ["ops@acme.example", "security@acme.example"]
    assert first["To"] == "ops@acme.example, security@acme.example"
    assert first["From"] == "tollgate@alerts.example"
    assert "Billing sync" in first["Subject"] and "203.0.113.9" in first["Subject"]
    assert "Billing sync" in second["Subject"] and "2001:db8::7" in second["Subject"]
    assert first["Message-ID"] == mid(api)
    assert second["Message-ID"] == mid(token)
    assert first["Message-ID"].startswith(f"<violation-{api}.")
    assert first["Date"] is not None and first["Auto-Submitted"] == "auto-generated"

    text = body_of(first)
    recorded_at = (await recorded_at_of(db, api)).strftime("%Y-%m-%d %H:%M:%S UTC")
    for expected in (
        "Billing sync",
        "billing-sync",
        "203.0.113.9",
        "valid access token",
        "API gateway",
        recorded_at,
        "was revoked",
        "rotate the client secret",
        "allow list",
        "Check where this application's credentials are used",
    ):
        assert expected in text, expected
    text = body_of(second)
    assert "valid client credentials" in text and "token endpoint" in text
    assert "no token was issued" in text and "was revoked" not in text

    for message in (first, second):
        raw = message.as_string()
        assert SECRET_HASH not in raw and FAMILY not in raw

    [sent] = sent_api
    assert sent.event == ev.ViolationNotificationSent(
        company_id="acme",
        client_id="billing-sync",
        violation_position=api,
        recipients=["ops@acme.example", "security@acme.example"],
    )
    assert sent.metadata.causation == api
    assert len(sent_token) == 1
    assert await checkpoint(db) >= token
    assert not any(SECRET_HASH in str(entry) for entry in logs)
    assert any(entry["event"] == "notifier.sent" for entry in logs)


async def recorded_at_of(db, position: int):
    return await db.pool.fetchval("SELECT recorded_at FROM events WHERE position = $1", position)


async def test_smtp_down_records_failures_then_delivers_once_when_it_is_back(db, tmp_path, smtp):
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        await add_app(ctx)
        position = await violate(ctx)
        async with running(notifier(ctx, db)):
            failures = await wait_for_stream(ctx, failures_stream(position), count=2)
            assert await ctx.eventlog.read_stream(notification_stream(position)) == []
            # The checkpoint moved on: the email waits in the pending retries, not in front
            # of the violations after it.
            assert await checkpoint(db) >= position
            await smtp.start()
            [sent] = await wait_for_stream(ctx, notification_stream(position))
            await eventually(lambda: len(smtp.mailbox.received) == 1)
            await asyncio.sleep(0.3)
        failures = await ctx.eventlog.read_stream(failures_stream(position))

    assert len(smtp.mailbox.received) == 1
    assert sent.event.recipients == ["ops@acme.example", "security@acme.example"]
    assert [f.event.attempt for f in failures] == list(range(1, len(failures) + 1))
    assert all(f.event.retry_at > f.recorded_at.timestamp() for f in failures)
    first = failures[0].event
    assert isinstance(first, ev.ViolationNotificationFailed)
    assert (first.company_id, first.client_id, first.violation_position) == (
        "acme",
        "billing-sync",
        position,
    )
    assert 0 < len(first.error) <= 200 and "SMTP" in first.error
    assert await checkpoint(db) >= position


async def test_a_restarted_notifier_does_not_resend(db, tmp_path, smtp):
    await smtp.start()
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        await add_app(ctx)
        before = await violate(ctx)
        async with running(notifier(ctx, db)):
            await wait_for_stream(ctx, notification_stream(before))
            await eventually(lambda: len(smtp.mailbox.received) == 1)
        after = await violate(ctx, ip="198.51.100.4")
        async with running(notifier(ctx, db)):
            await wait_for_stream(ctx, notification_stream(after))
            await eventually(lambda: len(smtp.mailbox.received) == 2)
            await asyncio.sleep(0.3)

    ids = [m["Message-ID"] for m in smtp.mailbox.messages]
    assert ids == [mid(before), mid(after)]


async def test_crash_between_sending_and_recording_resends_the_same_message(
    db, tmp_path, smtp, monkeypatch
):
    await smtp.start()
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        await add_app(ctx)
        position = await violate(ctx)
        append = ctx.eventlog.append

        async def crashing_append(stream_id, *args, **kwargs):
            if stream_id == notification_stream(position):
                raise EventLogUnavailable("the database went away")
            return await append(stream_id, *args, **kwargs)

        monkeypatch.setattr(ctx.eventlog, "append", crashing_append)
        with pytest.raises(EventLogUnavailable):
            await notifier(ctx, db).run_once()
        monkeypatch.undo()
        assert len(smtp.mailbox.received) == 1
        assert await checkpoint(db) < position

        await notifier(ctx, db).drain()  # "after the restart"
        sent = await ctx.eventlog.read_stream(notification_stream(position))

    assert len(sent) == 1
    first, second = smtp.mailbox.messages
    assert first["Message-ID"] == second["Message-ID"]  # recognisably the same email
    assert await checkpoint(db) >= position


async def test_recorded_but_not_checkpointed_is_not_sent_again(db, tmp_path, smtp):
    await smtp.start()
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        await add_app(ctx)
        position = await violate(ctx)
        recorded = ev.ViolationNotificationSent(
            company_id="acme",
            client_id="billing-sync",
            violation_position=position,
            recipients=["ops@acme.example"],
        )
        await ctx.eventlog.append(notification_stream(position), 0, [recorded])
        assert await notifier(ctx, db).drain() == 1
        assert len(await ctx.eventlog.read_stream(notification_stream(position))) == 1

    assert smtp.mailbox.received == []
    assert await checkpoint(db) == await db.pool.fetchval("SELECT max(position) FROM events")


async def test_the_checkpoints_move_without_waiting_for_their_flush(db, tmp_path, smtp):
    """Under load the worker moves its checkpoints every 50 ms; a move a crash loses only
    makes it read again (the test above: what is recorded is not sent again), so it does
    not wait for the WAL flush. The setting ends with the statement: the pool's sessions
    keep the durable default."""
    await smtp.start()
    await db.pool.execute(
        """
        CREATE TABLE checkpoint_commits (name text, synchronous_commit text);
        CREATE FUNCTION note_commit_setting() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO checkpoint_commits VALUES (NEW.name, current_setting('synchronous_commit'));
            RETURN NEW;
        END $$;
        CREATE TRIGGER note_commit_setting BEFORE UPDATE ON projection_checkpoints
            FOR EACH ROW EXECUTE FUNCTION note_commit_setting();
        """
    )
    # The test cluster skips flushes altogether: these sessions wait for theirs.
    durable = {"synchronous_commit": "on"}
    setting = "SELECT current_setting('synchronous_commit')"
    async with asyncpg.create_pool(db.dsn, min_size=2, max_size=2, server_settings=durable) as pool:
        database = Database(db.dsn, pool)
        async with open_context(smtp_settings(tmp_path, smtp), database=database) as ctx:
            await add_app(ctx)
            await violate(ctx)
            worker = notifier(ctx, db)
            async with running(worker):
                await eventually(lambda: len(smtp.mailbox.received) == 1)
                head = await db.pool.fetchval("SELECT max(position) FROM events")
                await eventually(lambda: worker.position >= head)
        async with pool.acquire() as a, pool.acquire() as b:
            assert [await a.fetchval(setting), await b.fetchval(setting)] == ["on", "on"]
    seen = await db.pool.fetch("SELECT name, synchronous_commit FROM checkpoint_commits")
    assert {r["name"] for r in seen} == {"notifier", "notifier-retries"}
    assert {r["synchronous_commit"] for r in seen} == {"off"}


async def test_without_smtp_the_email_is_an_eml_file_under_mail_dir(client, company, db):
    ctx = client.app[CONTEXT]
    settings = ctx.settings
    assert settings.smtp_host is None
    app = await new_app(
        client, company, name="Invoice export", notification_emails=["it@acme.example"]
    )
    first = await violate(ctx, app["client_id"], company_id=company.company_id)
    second = await violate(
        ctx, app["client_id"], ip="198.51.100.23", endpoint="policy_check", revoked=False,
        company_id=company.company_id,
    )  # fmt: skip
    worker = notifier(ctx, db)
    async with running(worker):
        for position in (first, second):
            await wait_for_stream(ctx, notification_stream(position))

    files = sorted(settings.mail_dir.glob("*.eml"))
    assert files == [eml_path(settings.mail_dir, first), eml_path(settings.mail_dir, second)]
    raw = files[0].read_bytes()
    assert b"\r\n" in raw  # RFC 5322 line endings
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["To"] == "it@acme.example"
    assert message["From"] == settings.mail_from
    assert "Invoice export" in message["Subject"] and "203.0.113.9" in message["Subject"]
    assert message["Message-ID"] == message_id(first, app["client_id"], settings.mail_from)
    text = body_of(message)
    assert app["client_id"] in text and "was revoked" in text
    assert app["client_secret"] not in raw.decode()
    later = email.message_from_bytes(files[1].read_bytes(), policy=email.policy.default)
    assert "policy check" in body_of(later) and "not revoked" in body_of(later)
    [sent] = await ctx.eventlog.read_stream(notification_stream(first))
    assert sent.event.recipients == ["it@acme.example"]
    assert sent.company_id == company.company_id  # in the company's own history


async def test_no_notification_address_records_sent_with_no_recipients(db, tmp_path, smtp):
    await smtp.start()
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        await add_app(ctx, "silent", name="Silent", emails=())
        await add_app(ctx, "gone", name="Gone")
        await ctx.eventlog.append(
            "application-gone", 1, [ev.ApplicationDeleted(company_id="acme", client_id="gone")]
        )
        silent = await violate(ctx, "silent")
        gone = await violate(ctx, "gone")  # reported after the application was deleted
        await notifier(ctx, db).drain()
        [silent_sent] = await ctx.eventlog.read_stream(notification_stream(silent))
        [gone_sent] = await ctx.eventlog.read_stream(notification_stream(gone))

    assert silent_sent.event.recipients == [] and silent_sent.event.client_id == "silent"
    assert gone_sent.event.recipients == [] and gone_sent.event.client_id == "gone"
    assert smtp.mailbox.received == []
    assert not list(tmp_path.glob("mail/*.eml"))


async def test_the_email_goes_to_the_addresses_the_application_had_at_the_violation(
    db, tmp_path, smtp
):
    """SPEC §2: the application's notification addresses get the email. The email may go
    out long after the violation (an SMTP outage, a notifier catching up): addresses
    changed or an application deleted since do not redirect or swallow it."""
    await smtp.start()
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        await add_app(ctx, "moved", name="Moved", emails=("old@acme.example",))
        await add_app(ctx, "gone", name="Gone", emails=("ops@acme.example",))
        moved = await violate(ctx, "moved")
        gone = await violate(ctx, "gone")
        await ctx.eventlog.append(
            "application-moved",
            1,
            [ev.NotificationEmailsChanged(company_id="acme", client_id="moved",
                                          before=["old@acme.example"], after=["new@acme.example"]),
             ev.ApplicationRenamed(company_id="acme", client_id="moved", before="Moved",
                                   after="Renamed")],
        )  # fmt: skip
        await ctx.eventlog.append(
            "application-gone", 1, [ev.ApplicationDeleted(company_id="acme", client_id="gone")]
        )
        await notifier(ctx, db).drain()
        [moved_sent] = await ctx.eventlog.read_stream(notification_stream(moved))
        [gone_sent] = await ctx.eventlog.read_stream(notification_stream(gone))

    assert moved_sent.event.recipients == ["old@acme.example"]
    assert gone_sent.event.recipients == ["ops@acme.example"]
    received = {tuple(rcpt): message for _, rcpt, message in smtp.mailbox.received}
    assert set(received) == {("old@acme.example",), ("ops@acme.example",)}
    assert "Moved" in received[("old@acme.example",)]["Subject"]


async def test_two_notifiers_send_each_email_once(db, tmp_path, smtp):
    await smtp.start()
    settings = smtp_settings(tmp_path, smtp)
    async with context(db, settings) as one, context(db, settings) as two:
        await add_app(one)
        first, second = notifier(one, db), notifier(two, db)
        async with running(first):
            await eventually(lambda: first.active)
            async with running(second):
                positions = [await violate(one, ip=f"203.0.113.{n}") for n in range(1, 6)]
                for position in positions:
                    await wait_for_stream(one, notification_stream(position))
                await eventually(lambda: len(smtp.mailbox.received) >= 5)
                await asyncio.sleep(0.3)
                assert not second.active  # it stood by the whole time
                # The active one goes away: the standby takes over.
                await first.close()
                await eventually(lambda: second.active)
                late = await violate(two, ip="203.0.113.99")
                await wait_for_stream(two, notification_stream(late))
                await eventually(lambda: len(smtp.mailbox.received) >= 6)
                await asyncio.sleep(0.3)

    ids = [m["Message-ID"] for m in smtp.mailbox.messages]
    assert ids == [mid(p) for p in [*positions, late]]
    for position in [*positions, late]:
        assert len(await one.eventlog.read_stream(notification_stream(position))) == 1


async def frozen_lock_session(
    db, tmp_path: Path, smtp: SmtpServer, stood_down: Callable[[Notifier, Context], Awaitable[int]]
) -> None:
    """A notifier whose lock's backend is frozen (SIGSTOP) once it holds the lock:
    `stood_down(worker, ctx)` runs meanwhile and returns the violation's position; then
    the backend goes on, finds its client gone and ends, and the notifier, holding the
    lock again, sends that violation's email, once."""
    await smtp.start()
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        await add_app(ctx)
        worker = notifier(ctx, db)
        async with running(worker):
            await eventually(lambda: worker._watch is not None)
            assert worker._watch is not None
            frozen: int | None = worker._watch.conn.get_server_pid()
            os.kill(frozen, signal.SIGSTOP)
            try:
                position = await stood_down(worker, ctx)
                assert not worker.active
                assert smtp.mailbox.received == []
                os.kill(frozen, signal.SIGCONT)
                frozen = None
                await eventually(lambda: len(smtp.mailbox.received) == 1)
            finally:
                if frozen is not None:
                    os.kill(frozen, signal.SIGCONT)
            await wait_for_stream(ctx, notification_stream(position))
            await asyncio.sleep(0.3)
    assert [m["Message-ID"] for m in smtp.mailbox.messages] == [mid(position)]


async def test_a_notifier_whose_lock_session_stops_answering_stands_down(db, tmp_path, smtp):
    """Its lock may be about to go to another process (the server drops a silent client
    after PEER_TIMEOUTS): the notifier stops within 2 x SESSION_CHECK and sends nothing
    until it holds the lock again, on a session that answers; each email still goes out
    once. Without the check it goes on sending, and once the lock is freed, beside the
    notifier that takes it."""

    async def stood_down(worker: Notifier, ctx: Context) -> int:
        await eventually(lambda: not worker.active, 2 * SESSION_CHECK + 3)
        position = await violate(ctx)
        await asyncio.sleep(1)  # an active notifier mails it within milliseconds
        return position

    await frozen_lock_session(db, tmp_path, smtp, stood_down)


async def test_a_notifier_checks_its_lock_session_before_each_email(
    db, tmp_path, smtp, monkeypatch
):
    """A host paused whole (a virtual machine stalled) resumes with the work running before
    the periodic check looks again, while the server may have freed the lock meanwhile:
    here the periodic check never looks, the lock's backend is frozen, and a violation
    arrives. The email waits for a round trip on the lock's session, which does not come:
    nothing is sent until the notifier holds the lock again."""

    async def never(_watch: SessionWatch) -> None:
        await asyncio.Event().wait()

    async def stood_down(worker: Notifier, ctx: Context) -> int:
        position = await violate(ctx)
        await eventually(lambda: not worker.active, SESSION_CHECK + 3)
        return position

    monkeypatch.setattr(SessionWatch, "watch", never)
    await frozen_lock_session(db, tmp_path, smtp, stood_down)


async def test_a_busy_log_is_followed_once_a_linger_not_once_a_commit(db, tmp_path, smtp):
    """Under load the log commits hundreds of times a second: a run per commit would add
    as many reads and checkpoint writes again. The first violation after a quiet spell is
    still mailed at once, whatever the linger."""
    await smtp.start()
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        await add_app(ctx)
        worker = notifier(ctx, db)
        worker.linger = 0.25
        runs = 0
        run_once = worker.run_once

        async def counted() -> int:
            nonlocal runs
            runs += 1
            return await run_once()

        worker.run_once = counted  # type: ignore[method-assign]
        async with running(worker):
            head = await ctx.eventlog.head()
            await eventually(lambda: worker.position >= head)
            await asyncio.sleep(0.3)  # past its linger: waiting for the next commit
            # Busy: twenty commits, 20 ms apart, each of them a wake-up.
            runs = 0
            for n in range(20):
                await add_app(ctx, f"busy-{n}")
                await asyncio.sleep(0.02)
            busy_runs = runs
            busy = await violate(ctx, ip="203.0.113.1")
            await wait_for_stream(ctx, notification_stream(busy))
            # Quiet again, and a linger far beyond any wait here: the next goes out at once.
            head = await ctx.eventlog.head()
            await eventually(lambda: worker.position >= head)
            await asyncio.sleep(0.3)
            worker.linger = 30.0
            quiet = await violate(ctx, ip="203.0.113.2")
            await wait_for_stream(ctx, notification_stream(quiet))

    # Without the linger: a run for each of the 20 commits at least.
    assert busy_runs <= 8, f"{busy_runs} runs for 20 commits"
    assert [m["Message-ID"] for m in smtp.mailbox.messages] == [mid(busy), mid(quiet)]


def test_backoff_doubles_up_to_its_cap():
    backoff = Backoff(base=1.0, cap=300.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff.delay(9) == 256.0 and backoff.delay(10) == 300.0
    assert backoff.delay(10_000) == 300.0


class Refusing(Mailbox):
    """Refuses, permanently, any message to bounce@…; accepts the rest."""

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        if address.startswith("bounce@"):
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"


async def test_a_permanently_refused_email_is_given_up_and_the_next_goes_out(db, tmp_path, smtp):
    smtp.mailbox = Refusing()
    await smtp.start()
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        await add_app(ctx, "bouncing", emails=("bounce@acme.example",))
        await add_app(ctx, "fine", name="Fine app", emails=("ops@acme.example",))
        first = await violate(ctx, "bouncing")
        second = await violate(ctx, "fine")
        worker = notifier(ctx, db)
        worker.max_refusals = 3
        async with running(worker):
            [given_up] = await wait_for_stream(ctx, notification_stream(first))
            [sent] = await wait_for_stream(ctx, notification_stream(second))
        failures = await ctx.eventlog.read_stream(failures_stream(first))
    assert isinstance(given_up.event, ev.ViolationNotificationAbandoned)
    assert given_up.event.attempts == 3
    assert given_up.event.reason == "refused"
    assert "550" in given_up.event.error
    assert len(failures) == 3
    assert isinstance(sent.event, ev.ViolationNotificationSent)
    assert [rcpts for _, rcpts, _ in smtp.mailbox.received] == [["ops@acme.example"]]


async def test_an_address_from_the_log_cannot_add_a_header_to_the_email(db, tmp_path, smtp):
    """Events written before addresses were checked stay in the log: one that carries a
    newline must neither reach a header nor hold up the violations after it."""
    await smtp.start()
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        await add_app(ctx)
        first = await violate(ctx, ip="fe80::1%\nBcc: thief@evil.example")
        second = await violate(ctx, ip="203.0.113.10")
        async with running(notifier(ctx, db)):
            await wait_for_stream(ctx, notification_stream(first))
            await wait_for_stream(ctx, notification_stream(second))
    received = smtp.mailbox.received
    assert len(received) == 2
    assert all("thief@evil.example" not in rcpts for _, rcpts, _ in received)
    injected = received[0][2]
    assert injected["Bcc"] is None
    assert "\n" not in injected["Subject"]


async def test_an_email_that_cannot_be_built_is_given_up_at_once(db, tmp_path, smtp, monkeypatch):
    import service.notification.notifier as notifier_module

    build = notifier_module.build_message

    def failing_for_the_first(*, position, **kw):
        if position == first:
            raise ValueError("Header values may not contain linefeed")
        return build(position=position, **kw)

    await smtp.start()
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        await add_app(ctx)
        first = await violate(ctx)
        second = await violate(ctx, ip="203.0.113.10")
        monkeypatch.setattr(notifier_module, "build_message", failing_for_the_first)
        async with running(notifier(ctx, db)):
            [given_up] = await wait_for_stream(ctx, notification_stream(first))
            [sent] = await wait_for_stream(ctx, notification_stream(second))
        failures = await ctx.eventlog.read_stream(failures_stream(first))
    assert isinstance(given_up.event, ev.ViolationNotificationAbandoned)
    assert given_up.event.attempts == 1  # no retry can build it: not five tries
    assert given_up.event.reason == "unsendable"
    assert len(failures) == 1
    assert isinstance(sent.event, ev.ViolationNotificationSent)


async def test_a_notifier_without_a_dsn_is_not_started(db, tmp_path, smtp):
    """Its lock is held on a session of its own (ended when the session stops answering,
    which frees the lock): a notifier given no DSN only runs `run_once`/`drain` in the
    caller's task, and refuses to start rather than run with no lock."""
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        worker = Notifier(ctx)
        with pytest.raises(ValueError, match="DSN"):
            await worker.start()
        assert worker._task is None
        assert not worker.active


async def test_a_notifier_warns_of_a_url_that_lets_the_server_drop_it_too_soon(db, tmp_path, smtp):
    short = with_short_drop(db.dsn)
    async with context(db, smtp_settings(tmp_path, smtp)) as ctx:
        worker = Notifier(ctx, dsn=short, standby_interval=0.05, poll_interval=0.05)
        with structlog.testing.capture_logs() as logs:
            async with running(worker):
                await eventually(lambda: worker.active)  # its lock taken on such a session
    warned = [e for e in logs if e["event"] == "database.peer_timeouts_short"]
    assert [e["dropped_after_s"] for e in warned] == [10.0]


@pytest.mark.parametrize(
    ("mail_from", "address", "name"),
    [
        ("alerts@bücher.example", "alerts@xn--bcher-kva.example", ""),
        # a special-use name is the operator's choice, as it is in ASCII
        ("alerts@bücher.internal", "alerts@xn--bcher-kva.internal", ""),
        ("Zoë Alerts <alerts@bücher.example>", "alerts@xn--bcher-kva.example", "Zoë Alerts"),
        ("Zoë Alerts <alerts@example.com>", "alerts@example.com", "Zoë Alerts"),
    ],
)
async def test_a_mail_from_in_another_script_goes_out_in_its_ascii_form(
    db, tmp_path, smtp, mail_from, address, name
):
    """An IDN domain as typed made the From header 'alerts@=?utf-8?q?b=C3=BCcher?=.example',
    which no mail program reads as an address, and an envelope sender only an SMTPUTF8
    server takes. Its ASCII form (xn--, RFC 5890) goes in both; a display name in any
    script stays the display name."""
    from service.settings import load_settings

    configured = load_settings({"MAIL_FROM": mail_from}, dotenv=False).mail_from
    settings = dataclasses.replace(smtp_settings(tmp_path, smtp), mail_from=configured)
    await smtp.start()
    async with context(db, settings) as ctx:
        await add_app(ctx)
        await violate(ctx)
        await notifier(ctx, db).drain()
    [(sender, _recipients, message)] = smtp.mailbox.received
    assert sender == address
    [author] = message["From"].addresses
    assert author.addr_spec == address
    assert author.display_name == name


async def test_after_the_log_was_cut_and_written_again_a_rebuild_reads_it_again(db, eventlog):
    """The notifier's checkpoint saw another event at its position: the violations written
    again below it were never looked at, and the checkpoint cannot move (schema.sql). The
    rebuild of every projection starts it again from the start, where the log says which
    emails went out; an intact log's checkpoint it leaves alone."""
    await companies(eventlog, "n", 8)
    for name, position in [(NAME, 6), (RETRIES, 5)]:
        await db.pool.execute(
            "INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING", name
        )
        await db.pool.execute(
            "UPDATE projection_checkpoints SET position = $2 WHERE name = $1", name, position
        )
    assert not await restart_if_rewritten(db.pool)
    await cut_tail(db.pool, 5)
    await companies(eventlog, "m", 4)
    assert await restart_if_rewritten(db.pool)
    rows = await db.pool.fetch(
        "SELECT name, position FROM projection_checkpoints WHERE name = ANY($1::text[])",
        [NAME, RETRIES],
    )
    assert {r["name"]: r["position"] for r in rows} == {NAME: 0, RETRIES: 0}
    assert not await restart_if_rewritten(db.pool)
