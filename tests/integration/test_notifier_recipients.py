"""Recipient by recipient, over a real SMTP server (aiosmtpd on loopback): one address the
server greylists (451) or refuses (550) beside one it takes, addresses in other scripts,
and an application name written to smuggle a header. Each address that can have the email
gets it once; what the server said of the others is in the log."""

from __future__ import annotations

import pytest

from service import events as ev
from service.notification.notifier import failures_stream, notification_stream
from tests.integration.test_notifier import (
    SmtpServer,
    add_app,
    context,
    eventually,
    notifier,
    running,
    smtp_settings,
    violate,
    wait_for_stream,
)
from tests.integration.test_notifier_isolation import Greylisting

OK = "ops@acme.example"
GREY = "security@acme.example"


class Refusing(Greylisting):
    """Greylists (451) the addresses in `greylisted`, refuses (550) those in `gone`."""

    def __init__(self) -> None:
        super().__init__()
        self.gone: frozenset[str] = frozenset()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        if address in self.gone:
            return "550 5.1.1 No such user"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


@pytest.fixture
async def server():
    smtp = SmtpServer()
    smtp.mailbox = Refusing()
    try:
        yield smtp
    finally:
        await smtp.stop()


def delivered(server: SmtpServer, address: str) -> int:
    return sum(address in rcpts for _, rcpts, _ in server.mailbox.received)


async def outcome(ctx, position: int) -> list:
    return [r.event for r in await ctx.eventlog.read_stream(notification_stream(position))]


async def test_a_greylisted_recipient_gets_the_email_later_and_the_other_only_once(
    db, tmp_path, server
):
    """README, Faults: at least once for every address. The address that took the email
    is not mailed again when the greylisted one is retried, across a restart too."""
    mailbox = server.mailbox
    mailbox.greylisted = frozenset({GREY})
    await server.start()
    async with context(db, smtp_settings(tmp_path, server)) as ctx:
        await add_app(ctx, emails=(OK, GREY))
        position = await violate(ctx)
        async with running(notifier(ctx, db)):
            await wait_for_stream(ctx, notification_stream(position))
            await wait_for_stream(ctx, failures_stream(position))
        [first] = await outcome(ctx, position)
        assert isinstance(first, ev.ViolationNotificationSent)
        assert (first.recipients, first.pending, first.refused) == ([OK], [GREY], [])
        assert delivered(server, OK) == 1 and delivered(server, GREY) == 0

        mailbox.greylisted = frozenset()
        async with running(notifier(ctx, db)):  # a new worker: restored from the log
            await wait_for_stream(ctx, notification_stream(position), 2)
        _, second = await outcome(ctx, position)
        assert isinstance(second, ev.ViolationNotificationSent)
        assert (second.recipients, second.pending) == ([GREY], [])
    assert delivered(server, GREY) == 1
    assert delivered(server, OK) == 1


async def test_a_recipient_refused_for_good_is_recorded_and_not_retried(db, tmp_path, server):
    server.mailbox.gone = frozenset({GREY})
    await server.start()
    async with context(db, smtp_settings(tmp_path, server)) as ctx:
        await add_app(ctx, emails=(OK, GREY))
        position = await violate(ctx)
        worker = notifier(ctx, db)
        async with running(worker):
            await wait_for_stream(ctx, notification_stream(position))
            await eventually(lambda: position not in worker.pending)
        [sent] = await outcome(ctx, position)
        assert (sent.recipients, sent.refused, sent.pending) == ([OK], [GREY], [])
        assert await ctx.eventlog.stream_version(failures_stream(position)) == 0
    assert delivered(server, OK) == 1


async def test_an_idn_domain_travels_in_ascii_and_a_wide_local_part_does_not_hold_back_the_rest(
    db, tmp_path, server
):
    """An address recorded before local parts had to be ASCII needs SMTPUTF8 (RFC 6531):
    it goes in a transaction of its own, so that a server that refuses it does not hold
    back the others, and its refusal is recorded. An IDN domain goes as xn--, in the
    envelope and in To."""
    wide = "jösé@acme.example"
    server.mailbox.gone = frozenset({wide})
    await server.start()
    async with context(db, smtp_settings(tmp_path, server)) as ctx:
        await add_app(ctx, emails=("ops@bücher.example", wide, OK))
        position = await violate(ctx)
        async with running(notifier(ctx, db)):
            await wait_for_stream(ctx, notification_stream(position))
        [sent] = await outcome(ctx, position)
        assert sorted(sent.recipients) == sorted(["ops@bücher.example", OK])
        assert (sent.refused, sent.pending) == ([wide], [])
    [(_, rcpts, message)] = server.mailbox.received
    assert sorted(rcpts) == sorted(["ops@xn--bcher-kva.example", OK])
    assert "xn--bcher-kva.example" in message["To"] and "=?" not in str(message["To"])


async def test_an_encoded_word_in_the_name_adds_no_header(db, tmp_path, server):
    """Python's email package decodes "=?...?=" in a value it is given, CR LF included,
    and every mail program decodes it on display: the name stays the text it was."""
    await server.start()
    name = "=?utf-8?q?Billing=0D=0AReply-To:_x@evil.example=0D=0A=0D=0AAll_fine?="
    async with context(db, smtp_settings(tmp_path, server)) as ctx:
        await add_app(ctx, name=name, emails=("=?utf-8?q?x?=@acme.example", OK))
        position = await violate(ctx)
        async with running(notifier(ctx, db)):
            await wait_for_stream(ctx, notification_stream(position))
    [(_, rcpts, message)] = server.mailbox.received
    assert OK in rcpts
    assert message["Reply-To"] is None
    for field in ("From", "To", "Date", "Message-ID"):
        assert message[field], field
    subject = str(message["Subject"])
    assert "\n" not in subject and "\r" not in subject
    assert subject.replace("\u2060", "").count(name) == 1  # shown as typed
    assert "Reply-To: x@evil.example" not in message.get_body(("plain",)).get_content()
    assert str(message["To"]) == OK  # the address that would be decoded is left out of To


class Counted:
    """Stands for the metrics: what the notifier counted."""

    def __init__(self) -> None:
        self.sent = 0
        self.failed = 0

    def email_sent(self) -> None:
        self.sent += 1

    def email_failed(self) -> None:
        self.failed += 1


async def test_an_email_is_counted_as_sent_only_when_one_went_out(db, tmp_path, server):
    """Before, a violation of an application with no notification address counted a sent
    email (`tollgate_emails_sent_total`), which also kept the alert on a notifier that
    sends nothing from firing."""
    await server.start()
    async with context(db, smtp_settings(tmp_path, server)) as ctx:
        counted = Counted()
        ctx.metrics = counted  # type: ignore[assignment]
        await add_app(ctx, "quiet", emails=())
        await add_app(ctx, "loud")
        quiet = await violate(ctx, "quiet")
        assert await notifier(ctx, db).drain() == 1
        [sent] = await outcome(ctx, quiet)
        assert isinstance(sent, ev.ViolationNotificationSent) and sent.recipients == []
        assert counted.sent == 0
        await violate(ctx, "loud")
        assert await notifier(ctx, db).drain() == 1
        assert counted.sent == 1
