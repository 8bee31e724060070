"""The IP-violation notifier: turns IpViolationDetected events into emails, at least once.

Delivery follows the log, not the request that saw the violation: the worker reads
violations after its checkpoint (the row "notifier" in projection_checkpoints), sends
one email per violation and records `ViolationNotificationSent` on the stream
`notification-{position}` with expected version 0 before it moves the checkpoint. So:

- a crash after sending but before recording resends on restart (at-least-once: the
  Message-ID is derived from the violation, so a resend is recognisable as the same mail);
- a crash after recording but before the checkpoint moved finds the Sent event and skips;
- a second worker that slipped past the lock cannot record twice (expected version 0).

Only one notifier runs across processes: it holds a session-level advisory lock on a
connection of its own for as long as it runs, like the projection workers; the others
stand by and try again. A failed send is recorded (`ViolationNotificationFailed` on
`notification-failures-{position}`) and retried with exponential backoff; later
violations wait, so emails go out in violation order. Only the recipients' refusal (a
5xx about the message) gives an email up after `max_refusals`; a login the provider
refuses or a certificate that does not verify is our configuration, retried until an
operator fixes it, with one error line per attempt that says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
from dataclasses import dataclass
from email.message import EmailMessage

import aiosmtplib
import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from projections.memory import AppState
from projections.runner import CheckpointMoved, lock_key
from service.context import Context
from service.database import Conn
from service.eventlog import ConcurrencyError, EventLogError, Metadata, RecordedEvent
from service.events import (
    IpViolationDetected,
    ViolationNotificationAbandoned,
    ViolationNotificationFailed,
    ViolationNotificationSent,
)
from service.mail import (
    Unsendable,
    auth_failed,
    build_message,
    describe,
    permanent,
    tls_failed,
    write_eml,
)

log = structlog.get_logger(__name__)

NAME = "notifier"  # its checkpoint row and its advisory lock
_TYPES = ("IpViolationDetected",)


def notification_stream(position: int) -> str:
    return f"notification-{position}"


def failures_stream(position: int) -> str:
    return f"notification-failures-{position}"


class LockLost(Exception):
    """The connection holding the advisory lock closed: another worker may take over."""


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt n+1 after n failures: base, 2·base, 4·base … at most cap."""

    base: float = 1.0
    cap: float = 300.0

    def delay(self, failures: int) -> float:
        return float(min(self.cap, self.base * 2 ** min(max(failures - 1, 0), 40)))


class Notifier:
    """The worker. `start()`/`close()` run it in the background under the lock;
    `run_once()`/`drain()` do the work in the caller's task (tests, one-off runs) and do
    not take the lock."""

    def __init__(
        self,
        ctx: Context,
        *,
        dsn: str | None = None,
        backoff: Backoff | None = None,
        batch_size: int = 100,
        standby_interval: float = 2.0,
        poll_interval: float | None = None,
        smtp_timeout: float = 30.0,
        max_refusals: int = 5,
    ) -> None:
        self.ctx = ctx
        self.dsn = dsn  # None: the lock connection is borrowed from ctx.pool for good
        self.backoff = backoff or Backoff()
        self.batch_size = batch_size
        self.standby_interval = standby_interval
        self.poll_interval = poll_interval or ctx.eventlog.poll_interval
        self.smtp_timeout = smtp_timeout
        #: the recipients' permanent (5xx) refusals in a row after which an email is given
        #: up; failures to log in or to set up TLS never count
        self.max_refusals = max_refusals
        self.position = 0  # the checkpoint as this worker last read or wrote it
        self.active = False  # holds the lock and works (the others stand by)
        self._task: asyncio.Task[None] | None = None
        self._lock_conn: Conn | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
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
        conn = await self._connect()
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(NAME)):
                return  # another process runs it; stand by and try again later
            self._lock_conn, self.active = conn, True
            log.info("notifier.started")
            while not conn.is_closed():
                if await self.run_once() < self.batch_size:
                    await self.ctx.eventlog.wakeup.wait(self.position, self.poll_interval)
        finally:
            self._lock_conn, self.active = None, False
            await self._disconnect(conn)

    async def _connect(self) -> Conn:
        if self.dsn is not None:
            conn: Conn = await asyncpg.connect(self.dsn)
            return conn
        return await self.ctx.pool.acquire()

    async def _disconnect(self, conn: Conn) -> None:
        # Closing the session releases its advisory lock; a pool connection is reset (which
        # unlocks too) on release, but unlock explicitly rather than rely on that.
        with contextlib.suppress(Exception):
            if isinstance(conn, PoolConnectionProxy):
                if not conn.is_closed():
                    await conn.execute("SELECT pg_advisory_unlock_all()")
                await self.ctx.pool.release(conn)
            else:
                await conn.close()

    # --- the work --------------------------------------------------------------------

    async def run_once(self) -> int:
        """Handle one batch of violations after the checkpoint; return how many."""
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
            await self._deliver(recorded)
            await self._advance(recorded.position)
        end = batch[-1].position if len(batch) == self.batch_size else head
        if end > self.position:
            await self._advance(end)
        return len(batch)

    async def drain(self) -> int:
        """Work until the checkpoint reaches the head as it is now; return how many."""
        target = await self.ctx.eventlog.head()
        handled = 0
        while await self.checkpoint() < target:
            handled += await self.run_once()
        return handled

    async def _deliver(self, recorded: RecordedEvent) -> None:
        """Send the violation's email until it goes out, or find it already recorded."""
        violation = recorded.event
        assert isinstance(violation, IpViolationDetected)
        position = recorded.position
        failures = await self.ctx.eventlog.stream_version(failures_stream(position))
        refusals = 0  # consecutive permanent (5xx) refusals in this run
        while True:
            self._check_lock()
            if await self.ctx.eventlog.stream_version(notification_stream(position)):
                log.info("notifier.already_recorded", position=position)
                return
            await self.ctx.feed.wait_for(position)
            app = self.ctx.policy.apps.get(violation.client_id)
            try:
                recipients = await self._send(recorded, violation, app)
            except Exception as exc:
                failures += 1
                error = self._describe(exc)
                self._log_failure(position, failures, exc, error)
                await self._record_failure(position, violation, failures, error)
                refusals = refusals + 1 if permanent(exc) else 0
                if refusals >= self.max_refusals or isinstance(exc, Unsendable):
                    # Later violations wait for this one: never let one block them all.
                    await self._record_abandoned(position, violation, failures, error)
                    return
                await asyncio.sleep(self.backoff.delay(failures))
                continue
            await self._record_sent(position, violation, recipients)
            return

    async def _send(
        self, recorded: RecordedEvent, violation: IpViolationDetected, app: AppState | None
    ) -> list[str]:
        """Send (or drop as a file) the email; return the recipients that accepted it."""
        recipients = list(dict.fromkeys(app.notification_emails)) if app is not None else []
        if not recipients:
            log.info("notifier.no_recipients", position=recorded.position)
            return []
        settings = self.ctx.settings
        try:
            message = build_message(
                position=recorded.position,
                violation=violation,
                app_name=app.name if app is not None else None,
                recorded_at=recorded.recorded_at,
                recipients=recipients,
                mail_from=settings.mail_from,
            )
            message.as_bytes(policy=email.policy.SMTP)  # a header that cannot be encoded
        except (ValueError, TypeError, UnicodeError) as exc:
            raise Unsendable(describe(exc)) from exc
        if settings.smtp_host:
            refused = await self._smtp(message, recipients, settings.smtp_host)
            if refused:
                # Some accepted it: retrying would mail them again; the rest stays logged.
                log.warning(
                    "notifier.recipients_refused",
                    position=recorded.position,
                    refused={r: response.code for r, response in refused.items()},
                )
            recipients = [r for r in recipients if r not in refused]
        else:
            await asyncio.to_thread(write_eml, settings, recorded.position, message)
        log.info(
            "notifier.sent",
            position=recorded.position,
            client_id=violation.client_id,
            recipients=len(recipients),
            transport="smtp" if settings.smtp_host else "file",
        )
        return recipients

    async def _smtp(
        self, message: EmailMessage, recipients: list[str], host: str
    ) -> dict[str, aiosmtplib.SMTPResponse]:
        """Hand the message to the mail server; return the recipients it refused."""
        settings = self.ctx.settings
        ca_file = settings.smtp_ca_file
        refused, _reply = await aiosmtplib.send(
            message,
            sender=settings.mail_from,
            recipients=recipients,
            hostname=host,
            port=settings.smtp_port,
            timeout=self.smtp_timeout,
            username=settings.smtp_username,
            password=settings.smtp_password,
            use_tls=settings.smtp_tls == "tls",
            # Required, not opportunistic: a server that does not offer STARTTLS is an
            # error, so an attacker who strips it cannot read the login. `none` means none,
            # even when offered: it is the opt-out for a relay whose certificate cannot
            # verify.
            start_tls=settings.smtp_tls == "starttls",
            validate_certs=settings.smtp_tls_verify,
            cert_bundle=str(ca_file) if ca_file is not None else None,
        )
        return refused

    async def _record_sent(
        self, position: int, violation: IpViolationDetected, recipients: list[str]
    ) -> None:
        event = ViolationNotificationSent(
            company_id=violation.company_id,
            client_id=violation.client_id,
            violation_position=position,
            recipients=recipients,
        )
        self.ctx.count("email_sent")
        try:
            await self.ctx.eventlog.append(
                notification_stream(position), 0, [event], Metadata(causation=position)
            )
        except ConcurrencyError:
            log.info("notifier.recorded_elsewhere", position=position)

    async def _record_abandoned(
        self, position: int, violation: IpViolationDetected, attempts: int, error: str
    ) -> None:
        log.error("notifier.abandoned", position=position, attempts=attempts, error=error)
        event = ViolationNotificationAbandoned(
            company_id=violation.company_id,
            client_id=violation.client_id,
            violation_position=position,
            attempts=attempts,
            error=error,
        )
        try:
            # In the notification stream: it counts as handled, like a Sent event.
            await self.ctx.eventlog.append(
                notification_stream(position), 0, [event], Metadata(causation=position)
            )
        except ConcurrencyError:
            log.info("notifier.recorded_elsewhere", position=position)

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, secrets=(self.ctx.settings.smtp_password,))

    def _log_failure(self, position: int, attempt: int, exc: Exception, error: str) -> None:
        """One line per failed attempt; an error when an operator has to act on it."""
        settings = self.ctx.settings
        where = {"host": settings.smtp_host, "port": settings.smtp_port}
        if auth_failed(exc):
            log.error(
                "notifier.smtp_auth_failed",
                **where,
                username=settings.smtp_username,
                position=position,
                attempt=attempt,
                error=error,
            )
        elif tls_failed(exc):
            log.error(
                "notifier.smtp_tls_failed",
                **where,
                tls=settings.smtp_tls,
                verify=settings.smtp_tls_verify,
                ca_file=str(settings.smtp_ca_file) if settings.smtp_ca_file else None,
                position=position,
                attempt=attempt,
                error=error,
            )
        else:
            log.warning("notifier.send_failed", position=position, attempt=attempt, error=error)

    async def _record_failure(
        self, position: int, violation: IpViolationDetected, attempt: int, error: str
    ) -> None:
        self.ctx.count("email_failed")
        event = ViolationNotificationFailed(
            company_id=violation.company_id,
            client_id=violation.client_id,
            violation_position=position,
            attempt=attempt,
            error=error,
        )
        try:
            await self.ctx.eventlog.append(
                failures_stream(position), None, [event], Metadata(causation=position)
            )
        except EventLogError as exc:
            # The retry goes on; only the record of this attempt is missing.
            log.warning("notifier.failure_not_recorded", position=position, error=str(exc))

    def _check_lock(self) -> None:
        if self._lock_conn is not None and self._lock_conn.is_closed():
            raise LockLost(NAME)

    # --- checkpoint ------------------------------------------------------------------

    async def ensure_checkpoint(self) -> None:
        await self.ctx.pool.execute(
            "INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING", NAME
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
            "UPDATE projection_checkpoints SET position = $2, updated_at = now() "
            "WHERE name = $1 AND position = $3",
            NAME,
            position,
            self.position,
        )
        if status != "UPDATE 1":
            raise CheckpointMoved(NAME)
        self.position = position
