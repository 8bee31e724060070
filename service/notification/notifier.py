"""The IP-violation notifier: turns IpViolationDetected events into emails, at least once.

Each email also covers the attempts counted since the previous one about the same
application and address (IpViolationsCoalesced, see service/alerts.py): those are recorded
as counts and never mailed one by one, so a flood is one email per VIOLATION_WINDOW.

Delivery follows the log, not the request that saw the violation. The worker reads the
violations after its checkpoint (the row "notifier" in projection_checkpoints), in log
order, and makes one attempt at each one's email. The checkpoint moves past a violation
once the attempt's outcome is recorded:

- sent: `ViolationNotificationSent` on `notification-{position}`, at version 0, or after
  an earlier Sent that left recipients `pending` (refused for now: 4xx), who are retried
  alone until an event on the stream leaves none;
- given up: `ViolationNotificationAbandoned` on that same stream, after what is there;
- failed: `ViolationNotificationFailed` on `notification-failures-{position}`, with the
  attempt number and when the next one is due (`retry_at`).

A failed email is *pending* (a Failed event, neither Sent nor Abandoned) and a second loop
retries it when due, each email on its own backoff (1 s, doubling up to NOTIFY_RETRY_MAX):
one company's greylisting or full mailbox never holds back another's alert, and fresh
emails still go out in violation order. The pending set lives in memory and is rebuilt
from the log whenever a worker takes over, from the Failed, Sent and Abandoned events
after the row "notifier-retries": a low-water mark at or below which every violation is
settled, so a restart reads only the tail it needs. So:

- a crash after sending but before recording resends on restart (at-least-once: the
  Message-ID is derived from the violation, so a resend is recognisable as the same mail);
- a crash after recording but before the checkpoint moved finds the Sent event and skips;
- a pending retry survives a restart: its Failed events are in the log;
- a second worker that slipped past the lock cannot record twice (each append expects
  the version its attempt found).

Only one notifier runs across processes: it holds a session-level advisory lock on a
connection of its own for as long as it runs, like the projection workers; the others
stand by and try again.

A server that cannot be reached (or refuses our login or TLS) fails every email alike:
while it does, the emails that failed that way wait behind the last one to try, rather
than each open a connection and wait out a timeout of its own, and when an email goes
through they are all due at once. A recovered server is noticed within the backoff cap.

An email is given up (recorded with the reason, logged at error, never dropped in silence)
when the recipients' server refuses it permanently (5xx) `max_refusals` times in a row,
when it cannot be built at all, or when it has been failing for NOTIFY_GIVE_UP_AFTER. A
login the provider refuses or a certificate that does not verify is our configuration:
retried until an operator fixes it, never given up, with one error line per attempt that
says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import time
from dataclasses import dataclass, field

import aiosmtplib
import asyncpg
import structlog

from projections.memory import AppState, PolicyModel
from projections.runner import CheckpointMoved, lock_key
from service.context import Context
from service.domain import streams
from service.eventlog import ConcurrencyError, Metadata, RecordedEvent
from service.events import (
    IpViolationDetected,
    ViolationNotificationAbandoned,
    ViolationNotificationFailed,
    ViolationNotificationSent,
)
from service.notification.coalesced import Earlier, earlier_attempts
from service.notification.mail import (
    Unsendable,
    auth_failed,
    build_message,
    describe,
    login_secrets,
    permanent,
    server_side,
    smtp_address,
    smtp_send,
    tls_failed,
    write_eml,
)
from service.storage.database import (
    Conn,
    SessionWatch,
    lock_session,
    warn_if_dropped_too_soon,
    while_session_answers,
)

log = structlog.get_logger(__name__)

NAME = "notifier"  # its checkpoint row and its advisory lock
RETRIES = "notifier-retries"  # the low-water mark of the pending retries
#: A checkpoint moves without waiting for its WAL flush (under load the worker moves it
#: every 50 ms): one that a crash of the server loses leaves the one before it, from which
#: the worker reads again and finds each email's outcome already in the log (`_attempt`
#: looks first), as after any restart. Conditional on where this worker left it (see
#: `_advance`). The setting is local to the statement's own transaction.
_MOVE_CHECKPOINT = (
    "UPDATE projection_checkpoints SET position = $2, updated_at = now() "
    "WHERE name = $1 AND position = $3 AND set_config('synchronous_commit', 'off', true) = 'off'"
)
_TYPES = ("IpViolationDetected",)
_OUTCOMES = (
    "ViolationNotificationFailed",
    "ViolationNotificationSent",
    "ViolationNotificationAbandoned",
)


async def restart_if_rewritten(pool: asyncpg.Pool) -> bool:
    """After the log was cut and written again (schema.sql, projection_checkpoints_saw: the
    worker's checkpoint saw another event at its position, and cannot move), it reads the
    log again from the start: each violation whose email's outcome the log does not hold
    gets its email, no other (`_attempt` looks first). A worker running meanwhile finds its
    checkpoint moved, and starts again from it. False: its checkpoints see their events."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL tollgate.rebuild = 'on'")
        status = await conn.execute(
            """
            UPDATE projection_checkpoints SET position = 0
            WHERE name = ANY($1::text[]) AND EXISTS (
                SELECT 1 FROM projection_checkpoints c LEFT JOIN events e ON e.position = c.position
                WHERE c.name = ANY($1::text[]) AND c.position_hash IS NOT NULL
                  AND c.position_hash IS DISTINCT FROM e.hash)
            """,
            [NAME, RETRIES],
        )
    return status != "UPDATE 0"


def notification_stream(position: int) -> str:
    return f"notification-{position}"


def failures_stream(position: int) -> str:
    return f"notification-failures-{position}"


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt n+1 after n failures: base, 2·base, 4·base … at most cap."""

    base: float = 1.0
    cap: float = 60.0

    def delay(self, failures: int) -> float:
        return float(min(self.cap, self.base * 2 ** min(max(failures - 1, 0), 40)))


@dataclass(frozen=True)
class Delivery:
    """What one attempt's server said, recipient by recipient."""

    accepted: list[str]
    refused: list[str] = field(default_factory=list)  # for good
    later: list[str] = field(default_factory=list)  # for now: 4xx


class PartlyRefused(Exception):
    """Some recipients were told "not now" (4xx) while others took the email: those are
    retried alone, like any email that failed."""


@dataclass
class Pending:
    """An email that failed and waits for its next attempt."""

    recorded: RecordedEvent  # the violation
    attempts: int  # failed attempts so far (the last Failed event's number)
    first_failed: float  # unix seconds; the give-up bound counts from here
    retry_at: float  # unix seconds
    #: the recipients' 5xx refusals in a row, counted since this worker took over
    refusals: int = 0
    #: the last failure was the server's or our configuration's, not this message's
    server_side: bool = False

    @property
    def position(self) -> int:
        return self.recorded.position


class Notifier:
    """The worker. `start()`/`close()` run it in the background under the lock;
    `run_once()`/`drain()` make one attempt at each new violation's email in the caller's
    task (tests, one-off runs) and do not take the lock; `restore()` and `retry_due()` do
    the same for the pending retries."""

    def __init__(
        self,
        ctx: Context,
        *,
        dsn: str | None = None,
        backoff: Backoff | None = None,
        give_up_after: float | None = None,
        batch_size: int = 100,
        standby_interval: float = 2.0,
        poll_interval: float | None = None,
        smtp_timeout: float = 30.0,
        max_refusals: int = 5,
        linger: float = 0.05,
    ) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self.dsn = dsn  # where its lock's session goes (None: run_once/drain only)
        self.backoff = backoff or Backoff(cap=float(settings.notify_retry_max))
        #: seconds after its first failure at which a still-failing email is given up
        self.give_up_after = float(
            settings.notify_give_up_after if give_up_after is None else give_up_after
        )
        self.batch_size = batch_size
        self.standby_interval = standby_interval
        self.poll_interval = poll_interval or ctx.eventlog.poll_interval
        self.smtp_timeout = smtp_timeout
        #: seconds to wait after a run that moved the checkpoint, before the next: under
        #: load the log commits hundreds of times a second, and a run (the checkpoint, the
        #: head, a filtered read, two checkpoint writes) per commit would be as many queries
        #: and write transactions again. The first violation after a quiet spell is mailed
        #: at once; one under load waits at most this long.
        self.linger = linger
        #: the recipients' permanent (5xx) refusals in a row after which an email is given
        #: up; failures to log in or to set up TLS never count
        self.max_refusals = max_refusals
        self.position = 0  # the checkpoint as this worker last read or wrote it
        self.active = False  # holds the lock and works (the others stand by)
        self._task: asyncio.Task[None] | None = None
        self._watch: SessionWatch | None = None  # on the lock's session, while it is held
        self._pending: dict[int, Pending] = {}  # by violation position
        self._retry_wakeup = asyncio.Event()
        # The low-water mark as last read or written; None until restored.
        self._low: int | None = None
        self._low_lock = asyncio.Lock()

    @property
    def pending(self) -> frozenset[int]:
        """The violations whose email waits for a retry."""
        return frozenset(self._pending)

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self.dsn is None:
            raise ValueError("the notifier holds its lock on a session of its own: give it a DSN")
        warn_if_dropped_too_soon(self.dsn)
        await self.ensure_checkpoint()
        settings = self.ctx.settings
        if settings.smtp_host and settings.smtp_tls != "none" and not settings.smtp_tls_verify:
            # Said once at start: an opt-out that nobody remembers is how it stays on.
            log.warning(
                "notifier.smtp_tls_unverified",
                host=settings.smtp_host,
                detail="SMTP_TLS_VERIFY=false: a machine in the middle can pose as the server",
            )
        self._task = asyncio.create_task(self._supervise(), name="notifier")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _supervise(self) -> None:
        while True:
            try:
                await self._run_locked()
            except Exception as exc:
                # Only cancellation stops the worker; anything else is logged and retried.
                log.warning("notifier.restarting", error=self._describe(exc))
            await asyncio.sleep(self.standby_interval)

    async def _run_locked(self) -> None:
        assert self.dsn is not None  # start() refuses without one
        async with lock_session(self.dsn, lock_key(NAME)) as watch:
            if watch is None:
                return  # another process runs it; stand by and try again later
            self._watch, self.active = watch, True
            try:
                await self.restore()
                log.info("notifier.started", pending=len(self._pending))
                await while_session_answers(watch, self._follow(watch.conn), self._retry_forever())
            finally:
                self._watch, self.active = None, False

    async def _follow(self, conn: Conn) -> None:
        while not conn.is_closed():
            before = self.position
            if await self.run_once() >= self.batch_size:
                continue  # more violations are waiting
            await self.ctx.eventlog.wakeup.between_runs(
                before, self.position, self.poll_interval, self.linger
            )

    async def _retry_forever(self) -> None:
        while True:
            await self.retry_due()
            self._retry_wakeup.clear()
            next_due = min((entry.retry_at for entry in self._pending.values()), default=None)
            timeout = None if next_due is None else max(0.0, next_due - time.time())
            # Woken early by a new pending email or by one that went through.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: see Wakeup.wait
                    await self._retry_wakeup.wait()

    # --- the work --------------------------------------------------------------------

    async def run_once(self) -> int:
        """One attempt at each violation's email in a batch after the checkpoint, in log
        order; return how many violations the batch held."""
        checkpoint = await self.checkpoint()
        self.position = checkpoint
        # Read the head first: every event at or below it has committed (positions follow
        # commit order), so the checkpoint may move up to it past a filtered read.
        head = await self.ctx.eventlog.head()
        if head <= checkpoint:
            return 0
        batch = await self.ctx.eventlog.read_all(
            checkpoint, self.batch_size, types=_TYPES, until=head
        )
        for recorded in batch:
            if recorded.position not in self._pending:  # else restored: the retries have it
                await self._attempt(recorded)
            await self._advance(recorded.position)
        end = batch[-1].position if len(batch) == self.batch_size else head
        if end > self.position:
            await self._advance(end)
        await self._move_low_water()
        return len(batch)

    async def drain(self) -> int:
        """Work until the checkpoint reaches the head as it is now; return how many."""
        target = await self.ctx.eventlog.head()
        handled = 0
        while await self.checkpoint() < target:
            handled += await self.run_once()
        return handled

    async def retry_due(self) -> int:
        """One more attempt at each pending email whose time has come, the longest waiting
        first; return how many were attempted."""
        now = time.time()
        due = sorted(
            (entry for entry in self._pending.values() if entry.retry_at <= now),
            key=lambda entry: (entry.retry_at, entry.position),
        )
        attempted = 0
        for entry in due:
            if self._pending.get(entry.position) is not entry or entry.retry_at > time.time():
                continue  # settled, or lined up behind another (`_line_up_behind`) meanwhile
            attempted += 1
            await self._attempt(entry.recorded)
        if due:
            await self._move_low_water()
        return attempted

    async def _attempt(self, recorded: RecordedEvent) -> None:
        """Try the violation's email once; its outcome is in the log when this returns."""
        violation = recorded.event
        assert isinstance(violation, IpViolationDetected)
        position = recorded.position
        await self._confirm_lock()
        version, owed = await self._outcome(position)
        if version and not owed:
            log.info("notifier.already_recorded", position=position)
            self._pending.pop(position, None)
            return
        # Read before the try: the database's trouble is not a failed email (the worker
        # restarts and tries again from the checkpoint).
        app = await self._app_when(violation.client_id, position)
        earlier = await earlier_attempts(self.ctx.pool, violation, position)
        try:
            delivery = await self._send(recorded, violation, app, earlier, only=owed)
        except Exception as exc:
            await self._failed(recorded, violation, exc)
            return
        if not await self._record_sent(position, violation, delivery, version):
            self._pending.pop(position, None)  # recorded elsewhere
            return
        if delivery.accepted:  # else no server took it: that says nothing about it
            self._server_is_back()
        if delivery.later:
            said = ", ".join(delivery.later)
            await self._failed(recorded, violation, PartlyRefused(f"not now (4xx) for {said}"))
        else:
            self._pending.pop(position, None)

    async def _outcome(self, position: int) -> tuple[int, list[str] | None]:
        """The notification stream's version, and the recipients its last event leaves
        owed (None: nothing recorded yet, so all of them; []: settled)."""
        recorded = await self.ctx.eventlog.read_stream(notification_stream(position))
        if not recorded:
            return 0, None
        last = recorded[-1].event
        owed = list(last.pending) if isinstance(last, ViolationNotificationSent) else []
        return recorded[-1].version, owed

    async def _app_when(self, client_id: str, position: int) -> AppState | None:
        """The application as it was when the violation at `position` was recorded: the
        email goes to the notification addresses of then, under the name of then. It may
        go out long after (retried through an SMTP outage, or by a notifier catching up),
        when the addresses have changed or the application is gone."""
        history = await self.ctx.eventlog.read_stream(streams.application(client_id))
        then = PolicyModel()
        then.apply([recorded for recorded in history if recorded.position < position])
        return then.apps.get(client_id)

    def _server_is_back(self) -> None:
        """An email went through: those that failed only for want of a working server need
        not wait out their backoff."""
        now = time.time()
        woken = [entry for entry in self._pending.values() if entry.server_side]
        for entry in woken:
            entry.retry_at, entry.server_side = min(entry.retry_at, now), False
        if woken:
            self._retry_wakeup.set()

    async def _failed(
        self, recorded: RecordedEvent, violation: IpViolationDetected, exc: Exception
    ) -> None:
        """Record the failed attempt and schedule the next, or give the email up."""
        position, now = recorded.position, time.time()
        entry = self._pending.get(position)
        if entry is None:
            attempts = await self.ctx.eventlog.stream_version(failures_stream(position))
            entry = Pending(recorded, attempts, first_failed=now, retry_at=now)
        entry.attempts += 1
        entry.refusals = entry.refusals + 1 if permanent(exc) else 0
        entry.server_side = server_side(exc)
        error = self._describe(exc)
        reason = self._give_up_reason(entry, exc, now)
        if reason is not None:
            self._log_failure(position, entry.attempts, exc, error, retry_in=None)
            await self._record_failure(position, violation, entry.attempts, error, None)
            await self._record_abandoned(entry, violation, error, reason, now)
            self._pending.pop(position, None)
            return
        delay = self.backoff.delay(entry.attempts)
        self._log_failure(position, entry.attempts, exc, error, retry_in=delay)
        # Recorded before the checkpoint moves on: the log is what a restart retries from.
        await self._record_failure(position, violation, entry.attempts, error, now + delay)
        entry.retry_at = now + delay
        self._pending[position] = entry
        if entry.server_side:
            self._line_up_behind(entry)
        self._retry_wakeup.set()

    def _line_up_behind(self, probe: Pending) -> None:
        """The server just failed `probe`: the other emails that wait for a working server
        wait for its next attempt, instead of each trying on a connection (and a timeout) of
        its own. When it gets through, they follow at once (`_server_is_back`)."""
        for entry in self._pending.values():
            if entry.server_side and entry is not probe:
                entry.retry_at = max(entry.retry_at, probe.retry_at)

    def _give_up_reason(self, entry: Pending, exc: Exception, now: float) -> str | None:
        if isinstance(exc, Unsendable):
            return "unsendable"  # no retry can build it
        if entry.refusals >= self.max_refusals:
            return "refused"
        if auth_failed(exc) or tls_failed(exc):
            return None  # our configuration: the email goes out once an operator fixes it
        if now - entry.first_failed >= self.give_up_after:
            return "expired"
        return None

    async def _send(
        self,
        recorded: RecordedEvent,
        violation: IpViolationDetected,
        app: AppState | None,
        earlier: Earlier | None = None,
        *,
        only: list[str] | None = None,
    ) -> Delivery:
        """Send (or drop as a file) the email to the application's addresses, or `only`
        those still owed it; say what became of each."""
        recipients = list(dict.fromkeys(app.notification_emails)) if app is not None else []
        if only is not None:
            recipients = [r for r in recipients if r in only] or list(only)
        if not recipients:
            log.info("notifier.no_recipients", position=recorded.position)
            return Delivery([])
        # Over SMTP each address goes in its ASCII form (an IDN domain as xn--); one whose
        # local part is not ASCII needs SMTPUTF8, and goes in a transaction of its own, so
        # that a server without it does not hold back the others' email.
        forms = {r: smtp_address(r) for r in recipients}
        plain = [r for r in recipients if forms[r] is not None]
        wide = [r for r in recipients if forms[r] is None]
        settings = self.ctx.settings
        if not settings.smtp_host or not wide:
            return await self._send_to(recorded, violation, app, earlier, plain + wide, forms)
        delivery = await self._send_to(recorded, violation, app, earlier, plain, forms)
        try:
            wider = await self._send_to(recorded, violation, app, earlier, wide, forms)
        except aiosmtplib.SMTPNotSupported as exc:
            log.warning("notifier.recipients_refused", position=recorded.position,
                        refused=dict.fromkeys(wide, "SMTPUTF8"), error=str(exc))  # fmt: skip
            wider = Delivery([], refused=wide)
        except aiosmtplib.SMTPRecipientsRefused as exc:  # every one of them
            codes = {r.recipient: r.code for r in exc.recipients}
            log.warning("notifier.recipients_refused", position=recorded.position,
                        refused=codes)  # fmt: skip
            later = [r for r in wide if 400 <= codes.get(r, 450) < 500]
            wider = Delivery([], refused=[r for r in wide if r not in later], later=later)
        except Exception as exc:
            if not delivery.accepted:
                raise
            log.warning("notifier.send_failed", position=recorded.position,
                        recipients=len(wide), error=self._describe(exc))  # fmt: skip
            wider = Delivery([], later=wide)
        return Delivery(
            delivery.accepted + wider.accepted,
            delivery.refused + wider.refused,
            delivery.later + wider.later,
        )

    async def _send_to(
        self,
        recorded: RecordedEvent,
        violation: IpViolationDetected,
        app: AppState | None,
        earlier: Earlier | None,
        recipients: list[str],
        forms: dict[str, str | None],
    ) -> Delivery:
        if not recipients:
            return Delivery([])
        by_form = {forms[r] or r: r for r in recipients}
        settings = self.ctx.settings
        try:
            message = build_message(
                position=recorded.position,
                violation=violation,
                app_name=app.name if app is not None else None,
                recorded_at=recorded.recorded_at,
                recipients=list(by_form),
                mail_from=settings.mail_from,
                earlier=earlier,
                window=settings.violation_window,
            )
            message.as_bytes(policy=email.policy.SMTP)  # a header that cannot be encoded
        except (ValueError, TypeError, UnicodeError) as exc:
            raise Unsendable(describe(exc)) from exc
        refused: dict[str, int] = {}
        if settings.smtp_host:
            answers = await smtp_send(settings, message, list(by_form), self.smtp_timeout)
            refused = {by_form.get(form, form): answer.code for form, answer in answers.items()}
            if refused:
                # Some accepted it: each of the others is owed it alone (4xx) or never (5xx).
                log.warning(
                    "notifier.recipients_refused", position=recorded.position, refused=refused
                )
        else:
            await asyncio.to_thread(write_eml, settings, recorded.position, message)
        accepted = [r for r in recipients if r not in refused]
        log.info(
            "notifier.sent",
            position=recorded.position,
            client_id=violation.client_id,
            recipients=len(accepted),
            transport="smtp" if settings.smtp_host else "file",
        )
        return Delivery(
            accepted,
            refused=[r for r, code in refused.items() if not 400 <= code < 500],
            later=[r for r, code in refused.items() if 400 <= code < 500],
        )

    async def _record_sent(
        self, position: int, violation: IpViolationDetected, delivery: Delivery, version: int
    ) -> bool:
        """Appended after the stream's `version` (what this attempt found there): False
        when another worker recorded first."""
        event = ViolationNotificationSent(
            company_id=violation.company_id,
            client_id=violation.client_id,
            violation_position=position,
            recipients=delivery.accepted,
            refused=delivery.refused,
            pending=delivery.later,
        )
        try:
            await self.ctx.eventlog.append(
                notification_stream(position), version, [event], Metadata(causation=position)
            )
        except ConcurrencyError:
            log.info("notifier.recorded_elsewhere", position=position)
            return False
        if delivery.accepted:  # an email went out (none does to an application with no address)
            self.ctx.count("email_sent")
        return True

    async def _record_abandoned(
        self,
        entry: Pending,
        violation: IpViolationDetected,
        error: str,
        reason: str,
        now: float,
    ) -> None:
        position = entry.position
        log.error(
            "notifier.abandoned",
            position=position,
            company_id=violation.company_id,
            client_id=violation.client_id,
            reason=reason,
            attempts=entry.attempts,
            failing_for=round(now - entry.first_failed, 1),
            error=error,
        )
        event = ViolationNotificationAbandoned(
            company_id=violation.company_id,
            client_id=violation.client_id,
            violation_position=position,
            attempts=entry.attempts,
            error=error,
            reason=reason,
        )
        stream = notification_stream(position)
        # After what is there: a Sent event that left recipients owed, if any.
        version = await self.ctx.eventlog.stream_version(stream)
        try:
            # In the notification stream: it counts as handled, like a Sent event.
            await self.ctx.eventlog.append(stream, version, [event], Metadata(causation=position))
        except ConcurrencyError:
            log.info("notifier.recorded_elsewhere", position=position)

    def _describe(self, exc: BaseException) -> str:
        settings = self.ctx.settings
        return describe(exc, secrets=login_secrets(settings.smtp_username, settings.smtp_password))

    def _log_failure(
        self, position: int, attempt: int, exc: Exception, error: str, *, retry_in: float | None
    ) -> None:
        """One line per failed attempt; an error when an operator has to act on it."""
        settings = self.ctx.settings
        common = {
            "host": settings.smtp_host,
            "port": settings.smtp_port,
            "position": position,
            "attempt": attempt,
            "retry_in": retry_in,
            "error": error,
        }
        if auth_failed(exc):
            log.error("notifier.smtp_auth_failed", **common, username=settings.smtp_username)
        elif tls_failed(exc):
            log.error(
                "notifier.smtp_tls_failed",
                **common,
                tls=settings.smtp_tls,
                verify=settings.smtp_tls_verify,
                ca_file=str(settings.smtp_ca_file) if settings.smtp_ca_file else None,
            )
        else:
            log.warning("notifier.send_failed", **common)

    async def _record_failure(
        self,
        position: int,
        violation: IpViolationDetected,
        attempt: int,
        error: str,
        retry_at: float | None,
    ) -> None:
        # Not best effort: the checkpoint moves past the violation on the strength of this
        # record, and a restart finds the pending retry by it. If it cannot be written, the
        # error restarts the worker, which tries the email again from the checkpoint.
        self.ctx.count("email_failed")
        event = ViolationNotificationFailed(
            company_id=violation.company_id,
            client_id=violation.client_id,
            violation_position=position,
            attempt=attempt,
            error=error,
            retry_at=retry_at,
        )
        await self.ctx.eventlog.append(
            failures_stream(position), None, [event], Metadata(causation=position)
        )

    async def _confirm_lock(self) -> None:
        """Before each email, the lock's session answers a round trip (or SessionLost): the
        watch finds a lost session within 10 s, but a host paused whole (a virtual machine
        stalled) resumes with this work running before the watch looks again, while the
        server may have freed the lock meanwhile; a session that answers now holds it."""
        if self._watch is not None:
            await self._watch.check()

    # --- the pending set, rebuilt from the log ---------------------------------------

    async def restore(self) -> None:
        """Rebuild the pending set: the violations after the low-water mark with a Failed
        event and neither a Sent nor an Abandoned one."""
        self._pending.clear()
        low = self._low = await self._low_water()
        head = await self.ctx.eventlog.head()
        failures: dict[int, list[tuple[float, ViolationNotificationFailed]]] = {}
        settled: set[int] = set()
        owed: set[int] = set()  # sent to some, owed to others (whether or not a Failed follows)
        after = low
        while batch := await self.ctx.eventlog.read_all(
            after, self.batch_size, types=_OUTCOMES, until=head
        ):
            for recorded in batch:
                event = recorded.event
                if isinstance(event, ViolationNotificationFailed):
                    at = recorded.recorded_at.timestamp()
                    failures.setdefault(event.violation_position, []).append((at, event))
                elif isinstance(event, ViolationNotificationSent) and event.pending:
                    settled.discard(event.violation_position)  # some are still owed it
                    owed.add(event.violation_position)
                elif isinstance(event, ViolationNotificationSent | ViolationNotificationAbandoned):
                    settled.add(event.violation_position)
            after = batch[-1].position
        for position in sorted((failures.keys() | owed) - settled):
            if position > low:
                await self._restore_one(position, failures.get(position, []))

    async def _restore_one(
        self, position: int, failures: list[tuple[float, ViolationNotificationFailed]]
    ) -> None:
        found = await self.ctx.eventlog.read_all(position - 1, 1, types=_TYPES)
        if not found or found[0].position != position:
            log.error("notifier.violation_missing", position=position)
            return
        now = time.time()
        last = failures[-1][1] if failures else None
        retry_at = now if last is None or last.retry_at is None else last.retry_at
        self._pending[position] = Pending(
            found[0],
            attempts=max((event.attempt for _, event in failures), default=0),
            first_failed=failures[0][0] if failures else now,
            # A NOTIFY_RETRY_MAX lowered since the failure applies at once.
            retry_at=min(retry_at, now + self.backoff.cap),
        )

    async def _low_water(self) -> int:
        value = await self.ctx.pool.fetchval(
            "SELECT position FROM projection_checkpoints WHERE name = $1", RETRIES
        )
        if value is None:
            await self.ensure_checkpoint()
            return await self._low_water()
        return int(value)

    async def _move_low_water(self) -> None:
        """Raise the low-water mark to just below the oldest pending violation, or to the
        checkpoint when none is pending, so that a restart reads no more than it needs."""
        async with self._low_lock:
            if self._low is None:
                return  # not restored (a one-off run): the mark stays where it is, still true
            low = min([self.position, *(position - 1 for position in self._pending)])
            if low <= self._low:
                return
            status = await self.ctx.pool.execute(
                _MOVE_CHECKPOINT,
                RETRIES,
                low,
                self._low,
            )
            if status != "UPDATE 1":
                raise CheckpointMoved(RETRIES)
            self._low = low

    # --- checkpoint ------------------------------------------------------------------

    async def ensure_checkpoint(self) -> None:
        """Its two rows, made when missing; read first, so that a start on a database that
        refuses writes, and finds them, writes nothing (see ProjectionRunner)."""
        found = await self.ctx.pool.fetchval(
            "SELECT count(*) FROM projection_checkpoints WHERE name = ANY($1::text[])",
            [NAME, RETRIES],
        )
        if found == 2:
            return
        await self.ctx.pool.execute(
            "INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING", NAME
        )
        # Workers before the pending set never moved the checkpoint past an email that had
        # not gone out: nothing at or below it waits for a retry.
        await self.ctx.pool.execute(
            "INSERT INTO projection_checkpoints (name, position) "
            "SELECT $1, position FROM projection_checkpoints WHERE name = $2 "
            "ON CONFLICT DO NOTHING",
            RETRIES,
            NAME,
        )

    async def checkpoint(self) -> int:
        value = await self.ctx.pool.fetchval(
            "SELECT position FROM projection_checkpoints WHERE name = $1", NAME
        )
        if value is None:
            await self.ensure_checkpoint()
            return 0
        return int(value)

    async def _advance(self, position: int) -> None:
        # Conditional on where this worker left it: a worker that lost its lock unnoticed
        # cannot move the checkpoint under the one that holds it now.
        status = await self.ctx.pool.execute(
            _MOVE_CHECKPOINT,
            NAME,
            position,
            self.position,
        )
        if status != "UPDATE 1":
            raise CheckpointMoved(NAME)
        self.position = position
