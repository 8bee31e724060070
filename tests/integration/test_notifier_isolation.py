"""One company's mail trouble never delays another's alert: each failing email is retried
on its own schedule, survives restarts, and is given up (and recorded) after a bounded
time; a real SMTP server (aiosmtpd on loopback) greylists one recipient or goes away."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import pytest
import structlog

from service import events as ev
from service.notification.notifier import (
    RETRIES,
    Backoff,
    Notifier,
    failures_stream,
    notification_stream,
)
from service.settings import ConfigError, Settings, load_settings
from tests.integration.test_notifier import (
    Mailbox,
    SmtpServer,
    add_app,
    checkpoint,
    context,
    eventually,
    mid,
    notifier,
    running,
    smtp_settings,
    violate,
    wait_for_stream,
)

A_MAIL = "ops@acme.example"  # company A's recipient: greylisted in these tests
B_MAIL = "ops@globex.example"


class Greylisting(Mailbox):
    """Answers 451 for the addresses in `greylisted` (a transient refusal: try again later)
    and 530 to every sender while `login_required` (a server that wants a login we did not
    give); accepts the rest. Runs on the server's thread: the flags are only ever swapped."""

    def __init__(self) -> None:
        super().__init__()
        self.greylisted: frozenset[str] = frozenset()
        self.login_required = False
        self.refused: list[str] = []

    async def handle_MAIL(self, server, session, envelope, address, mail_options) -> str:
        if self.login_required:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        if address in self.greylisted:
            self.refused.append(address)
            return "451 4.7.1 Greylisted, please try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
async def server() -> AsyncIterator[SmtpServer]:
    """Not started: a test starts it (or leaves the port dead)."""
    smtp = SmtpServer()
    smtp.mailbox = Greylisting()
    try:
        yield smtp
    finally:
        await smtp.stop()


def greylisting(server: SmtpServer) -> Greylisting:
    assert isinstance(server.mailbox, Greylisting)
    return server.mailbox


async def two_companies(ctx) -> None:
    await add_app(ctx, "a-sync", name="A sync", emails=(A_MAIL,), company_id="acme")
    await add_app(ctx, "b-sync", name="B sync", emails=(B_MAIL,), company_id="globex")


def delivered_to(server: SmtpServer, address: str) -> list[str]:
    """The Message-IDs of the messages that reached `address`, in arrival order."""
    return [m["Message-ID"] for _, rcpts, m in server.mailbox.received if address in rcpts]


def plain_notifier(ctx, db) -> Notifier:
    """Backoff and give-up bound from the settings, as `tollgate serve` wires it."""
    return Notifier(ctx, dsn=db.dsn, standby_interval=0.05, poll_interval=0.05, smtp_timeout=5)


async def low_water(db) -> int:
    return await db.pool.fetchval(
        "SELECT position FROM projection_checkpoints WHERE name = $1", RETRIES
    )


# --- one company's refusal does not hold back another's --------------------------------


async def test_a_greylisted_recipient_does_not_hold_back_another_companys_alert(
    db, tmp_path, server
):
    greylisting(server).greylisted = frozenset({A_MAIL})
    await server.start()
    async with context(db, smtp_settings(tmp_path, server)) as ctx:
        await two_companies(ctx)
        a = await violate(ctx, "a-sync", company_id="acme")
        b = await violate(ctx, "b-sync", company_id="globex")
        worker = notifier(ctx, db)
        with structlog.testing.capture_logs() as logs:
            async with running(worker):
                [b_sent] = await wait_for_stream(ctx, notification_stream(b))
                # B went out while A's recipient still refuses: A did not hold it back.
                assert await ctx.eventlog.read_stream(notification_stream(a)) == []
                assert a in worker.pending
                # A keeps failing on its own schedule; a later alert of B is not held either.
                await wait_for_stream(ctx, failures_stream(a), count=3)
                b_later = await violate(ctx, "b-sync", ip="198.51.100.7", company_id="globex")
                await wait_for_stream(ctx, notification_stream(b_later))
                assert await ctx.eventlog.read_stream(notification_stream(a)) == []

                greylisting(server).greylisted = frozenset()
                [a_sent] = await wait_for_stream(ctx, notification_stream(a))
                await eventually(lambda: len(server.mailbox.received) == 3)
                await asyncio.sleep(0.3)  # time enough for a duplicate to show up
            failures = await ctx.eventlog.read_stream(failures_stream(a))

    assert isinstance(b_sent.event, ev.ViolationNotificationSent)
    assert b_sent.event.recipients == [B_MAIL] and b_sent.company_id == "globex"
    assert isinstance(a_sent.event, ev.ViolationNotificationSent)
    assert a_sent.event.recipients == [A_MAIL] and a_sent.company_id == "acme"
    assert delivered_to(server, B_MAIL) == [mid(b, "b-sync"), mid(b_later, "b-sync")]
    assert delivered_to(server, A_MAIL) == [mid(a, "a-sync")]  # once, after the 451s
    assert len(failures) >= 3
    assert [f.event.attempt for f in failures] == list(range(1, len(failures) + 1))
    assert all("451" in f.event.error for f in failures)
    # Each failure says when the next attempt is due, within the backoff cap.
    for failure in failures:
        wait = failure.event.retry_at - failure.recorded_at.timestamp()
        assert 0 < wait <= worker.backoff.cap + 0.5
    failed_lines = [e for e in logs if e["event"] == "notifier.send_failed"]
    assert failed_lines and all(line["position"] == a for line in failed_lines)
    assert all(0 < line["retry_in"] <= worker.backoff.cap for line in failed_lines)
    assert await checkpoint(db) >= b_later
    assert a not in worker.pending


# --- restarts ---------------------------------------------------------------------------


async def test_a_pending_retry_continues_after_a_restart_and_is_delivered_once(
    db, tmp_path, server
):
    greylisting(server).greylisted = frozenset({A_MAIL})
    await server.start()
    settings = smtp_settings(tmp_path, server)
    async with context(db, settings) as ctx:
        await two_companies(ctx)
        a = await violate(ctx, "a-sync", company_id="acme")
        b = await violate(ctx, "b-sync", company_id="globex")
        async with running(notifier(ctx, db)):
            await wait_for_stream(ctx, failures_stream(a), count=2)
            await wait_for_stream(ctx, notification_stream(b))
        # Past A: after the restart only the pending set can bring A's email back.
        assert await checkpoint(db) >= b
        assert await low_water(db) == a - 1  # where a restart starts reading
        before_restart = len(await ctx.eventlog.read_stream(failures_stream(a)))

    # "Another process": a new context and worker, rebuilt from the log alone.
    async with context(db, settings) as ctx:
        worker = notifier(ctx, db)
        with structlog.testing.capture_logs() as logs:
            async with running(worker):
                # Still refused after the restart: the attempts go on, numbered on.
                await wait_for_stream(ctx, failures_stream(a), count=before_restart + 1)
                greylisting(server).greylisted = frozenset()
                [sent] = await wait_for_stream(ctx, notification_stream(a))
                await eventually(lambda: len(delivered_to(server, A_MAIL)) >= 1)
                await asyncio.sleep(0.3)
        failures = await ctx.eventlog.read_stream(failures_stream(a))

    assert isinstance(sent.event, ev.ViolationNotificationSent)
    assert delivered_to(server, A_MAIL) == [mid(a, "a-sync")]
    assert delivered_to(server, B_MAIL) == [mid(b, "b-sync")]  # not resent by the restart
    assert [f.event.attempt for f in failures] == list(range(1, len(failures) + 1))
    [started] = [e for e in logs if e["event"] == "notifier.started"]
    assert started["pending"] == 1
    # Nothing pending any more: the mark caught up with the checkpoint.
    await eventually(lambda: worker.pending == frozenset())
    assert await low_water(db) == await checkpoint(db)


# --- giving up --------------------------------------------------------------------------


async def test_an_email_failing_past_the_give_up_bound_is_abandoned_and_recorded(
    db, tmp_path, server
):
    greylisting(server).greylisted = frozenset({A_MAIL})
    await server.start()
    # From the settings, as NOTIFY_RETRY_MAX=1 and NOTIFY_GIVE_UP_AFTER=2 would give.
    settings = dataclasses.replace(
        smtp_settings(tmp_path, server), notify_retry_max=1, notify_give_up_after=2
    )
    async with context(db, settings) as ctx:
        await two_companies(ctx)
        a = await violate(ctx, "a-sync", company_id="acme")
        b = await violate(ctx, "b-sync", company_id="globex")
        worker = plain_notifier(ctx, db)
        with structlog.testing.capture_logs() as logs:
            async with running(worker):
                [b_sent] = await wait_for_stream(ctx, notification_stream(b))
                [given_up] = await wait_for_stream(ctx, notification_stream(a))
        failures = await ctx.eventlog.read_stream(failures_stream(a))

    assert (worker.backoff.cap, worker.give_up_after) == (1.0, 2.0)
    assert isinstance(b_sent.event, ev.ViolationNotificationSent)
    event = given_up.event
    assert isinstance(event, ev.ViolationNotificationAbandoned)
    assert event.reason == "expired"
    assert event.attempts == len(failures) >= 2
    assert "451" in event.error
    assert (event.company_id, event.client_id, event.violation_position) == ("acme", "a-sync", a)
    assert given_up.metadata.causation == a and given_up.company_id == "acme"
    span = failures[-1].recorded_at - failures[0].recorded_at
    assert span.total_seconds() >= 2 - 0.1  # it was tried for the whole bound
    *retried, last = failures
    assert last.event.retry_at is None  # no retry follows the last one
    assert all(f.event.retry_at is not None for f in retried)
    [line] = [e for e in logs if e["event"] == "notifier.abandoned"]
    assert line["log_level"] == "error"
    assert (line["position"], line["reason"], line["attempts"]) == (a, "expired", len(failures))
    assert line["company_id"] == "acme" and "451" in line["error"]
    assert delivered_to(server, A_MAIL) == []
    assert a not in worker.pending


async def test_a_login_the_server_wants_is_retried_past_the_give_up_bound(db, tmp_path, server):
    """A 530 is our configuration, not the recipients': the email waits for the fix."""
    greylisting(server).login_required = True
    await server.start()
    async with context(db, smtp_settings(tmp_path, server)) as ctx:
        await two_companies(ctx)
        a = await violate(ctx, "a-sync", company_id="acme")
        worker = Notifier(
            ctx,
            dsn=db.dsn,
            backoff=Backoff(base=0.05, cap=0.1),
            give_up_after=0.3,
            standby_interval=0.05,
            poll_interval=0.05,
        )
        with structlog.testing.capture_logs() as logs:
            async with running(worker):
                failures = await wait_for_stream(ctx, failures_stream(a), count=3)
                while (failures[-1].recorded_at - failures[0].recorded_at).total_seconds() < 0.6:
                    failures = await wait_for_stream(ctx, failures_stream(a), len(failures) + 1)
                assert await ctx.eventlog.read_stream(notification_stream(a)) == []
                greylisting(server).login_required = False
                [sent] = await wait_for_stream(ctx, notification_stream(a))

    assert isinstance(sent.event, ev.ViolationNotificationSent)
    assert "530" in failures[0].event.error
    assert all(f.event.retry_at is not None for f in failures)
    assert not [e for e in logs if e["event"] == "notifier.abandoned"]
    assert [e for e in logs if e["event"] == "notifier.smtp_auth_failed"]
    assert delivered_to(server, A_MAIL) == [mid(a, "a-sync")]


# --- an SMTP outage ---------------------------------------------------------------------


async def test_after_an_smtp_outage_the_waiting_emails_go_out_within_the_retry_cap(
    db, tmp_path, server
):
    settings = dataclasses.replace(smtp_settings(tmp_path, server), notify_retry_max=1)
    async with context(db, settings) as ctx:
        await two_companies(ctx)
        a = await violate(ctx, "a-sync", company_id="acme")
        b = await violate(ctx, "b-sync", company_id="globex")
        worker = plain_notifier(ctx, db)
        async with running(worker):
            # Four failures of the one that keeps trying for both: uncapped, the next wait
            # would be 8 s.
            await wait_for_stream(ctx, failures_stream(b))
            await wait_for_stream(ctx, failures_stream(a), count=4)
            assert await checkpoint(db) >= b  # both wait as pending retries
            await server.start()
            back = time.monotonic()
            await wait_for_stream(ctx, notification_stream(a))
            await wait_for_stream(ctx, notification_stream(b))
            took = time.monotonic() - back
            await eventually(lambda: len(server.mailbox.received) == 2)
            await asyncio.sleep(0.3)
        failures = await ctx.eventlog.read_stream(failures_stream(a))

    assert took < 5  # generous: the cap is 1 s
    assert delivered_to(server, A_MAIL) == [mid(a, "a-sync")]
    assert delivered_to(server, B_MAIL) == [mid(b, "b-sync")]
    assert "SMTPConnectError" in failures[0].event.error


async def test_while_the_server_is_down_one_waiting_email_a_round_tries_it(db, tmp_path, server):
    """Not one connection (and one timeout) per waiting email per round: one finds out, and
    the others follow it once it gets through."""
    async with context(db, smtp_settings(tmp_path, server)) as ctx:
        await two_companies(ctx)
        await add_app(ctx, "c-sync", name="C sync", emails=("ops@initech.example",))
        positions = [
            await violate(ctx, "a-sync", company_id="acme"),
            await violate(ctx, "b-sync", company_id="globex"),
            await violate(ctx, "c-sync", company_id="acme"),
        ]
        async with running(notifier(ctx, db)):
            counts: list[int] = []
            while sum(counts) < 12:
                await asyncio.sleep(0.05)
                counts = [
                    len(await ctx.eventlog.read_stream(failures_stream(p))) for p in positions
                ]
            await server.start()
            for position in positions:
                await wait_for_stream(ctx, notification_stream(position))
            await eventually(lambda: len(server.mailbox.received) == 3)

    # The first attempt of each is its own (fresh violations are each tried once); after
    # that one email probed for all three.
    probe, *others = sorted(counts, reverse=True)
    assert probe >= 8 and all(count <= 2 for count in others), counts
    assert len(delivered_to(server, B_MAIL)) == 1


async def test_the_first_email_through_after_an_outage_brings_the_waiting_ones_along(
    db, tmp_path, server
):
    """A long backoff is cut short once the server is seen to work again; an email that
    the recipients' server refuses keeps its own."""
    async with context(db, smtp_settings(tmp_path, server)) as ctx:
        await two_companies(ctx)
        await add_app(ctx, "c-sync", name="C sync", emails=("ops@initech.example",))
        a = await violate(ctx, "a-sync", company_id="acme")
        b = await violate(ctx, "b-sync", company_id="globex")
        worker = Notifier(
            ctx,
            dsn=db.dsn,
            backoff=Backoff(base=60, cap=60),  # longer than any wait below
            standby_interval=0.05,
            poll_interval=0.05,
        )
        async with running(worker):
            await wait_for_stream(ctx, failures_stream(a))
            await wait_for_stream(ctx, failures_stream(b))
            greylisting(server).greylisted = frozenset({A_MAIL})
            await server.start()
            # The next alert (of a third application) is the first email through.
            c = await violate(ctx, "c-sync", company_id="acme")
            await wait_for_stream(ctx, notification_stream(c))
            await wait_for_stream(ctx, notification_stream(b))
            # A was pulled forward too, and is now refused by its recipient: that failure
            # is about the message, so A waits out its backoff this time.
            await wait_for_stream(ctx, failures_stream(a), count=2)
            await asyncio.sleep(0.5)
            a_failures = await ctx.eventlog.read_stream(failures_stream(a))

    assert delivered_to(server, B_MAIL) == [mid(b, "b-sync")]
    assert delivered_to(server, A_MAIL) == []
    assert len(a_failures) == 2 and "451" in a_failures[1].event.error
    assert a in worker.pending


# --- settings ---------------------------------------------------------------------------


def test_retry_settings_default_to_a_minute_and_a_day():
    settings = load_settings({}, dotenv=False)
    assert (settings.notify_retry_max, settings.notify_give_up_after) == (60, 86400)
    assert Settings().notify_retry_max == 60


def test_retry_settings_are_read_from_the_environment():
    env = {"NOTIFY_RETRY_MAX": "30", "NOTIFY_GIVE_UP_AFTER": "3600"}
    settings = load_settings(env, dotenv=False)
    assert (settings.notify_retry_max, settings.notify_give_up_after) == (30, 3600)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"NOTIFY_RETRY_MAX": "soon"}, "NOTIFY_RETRY_MAX must be an integer"),
        ({"NOTIFY_RETRY_MAX": "0"}, "NOTIFY_RETRY_MAX must be from 1"),
        ({"NOTIFY_GIVE_UP_AFTER": "-5"}, "NOTIFY_GIVE_UP_AFTER must be from 1"),
        ({"NOTIFY_RETRY_MAX": "600", "NOTIFY_GIVE_UP_AFTER": "60"}, "must be at least"),
    ],
)
def test_bad_retry_settings_are_refused_by_name(env, named):
    with pytest.raises(ConfigError, match=named):
        load_settings(env, dotenv=False)
