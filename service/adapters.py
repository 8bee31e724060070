"""The protocol core's ports implemented once, over the in-memory read models (fed from the
event log in this process) and the event log itself."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from typing import TypeVar

import structlog

from projections.directory import AdminKey, DirectoryModel, User
from projections.feed import MemoryFeed
from projections.memory import PolicyModel
from service import events as ev
from service.domain.grants import Record
from service.domain.state import AppState, CodeState, ConnectionState, FamilyState, TokenState
from service.eventlog import EventLog, EventLogError, Metadata
from service.logs import error_text
from service.storage.database import view_clock, within

log = structlog.get_logger(__name__)

T = TypeVar("T")


class ModelLookups:
    """Every lookup is a dict access; a miss catches up with the log once and looks again
    (concurrent misses share one read: see MemoryFeed.catch_up).

    `max_staleness` (seconds; None: no bound): an access token, an admin key or a
    resource server's key is checked against models that hold everything committed that
    long ago, or not at all (EventLogUnavailable).
    Notifications and a poll every second keep them within a second of the log; a process
    that was paused, or cannot read the log, would otherwise go on honouring tokens
    revoked elsewhere for as long as that lasts."""

    def __init__(
        self,
        feed: MemoryFeed,
        policy: PolicyModel,
        directory: DirectoryModel,
        max_staleness: float | None = None,
    ) -> None:
        self._feed = feed
        self._policy = policy
        self._directory = directory
        self._max_staleness = max_staleness

    async def _found(self, look: Callable[[], T | None], *, just_read: bool = False) -> T | None:
        """`just_read`: the models were read up to date after this request came (made
        current): a miss is a miss, not worth a second read."""
        found = look()
        if found is None and not just_read:
            await self._feed.catch_up()  # written a moment ago through another process?
            found = look()
        return found

    async def _made_current(self) -> bool:
        """Whether the models had to be read up to date (MemoryFeed.made_current) before a
        credential is checked against them; False when they are within the bound."""
        if self._max_staleness is None:
            return False
        return await self._feed.made_current(self._max_staleness)

    async def application(self, client_id: str) -> AppState | None:
        return await self._found(lambda: self._policy.apps.get(client_id))

    async def code(self, code_hash: str) -> CodeState | None:
        return await self._found(lambda: self._policy.codes.get(code_hash))

    async def refresh_family(self, refresh_hash: str) -> tuple[str, FamilyState] | None:
        def look() -> tuple[str, FamilyState] | None:
            family_id = self._policy.refresh_tokens.get(refresh_hash)
            family = self._policy.families.get(family_id) if family_id is not None else None
            return None if family is None or family_id is None else (family_id, family)

        return await self._found(look)

    async def access_token(self, key: bytes, now: float) -> TokenState | None:
        just_read = await self._made_current()
        return await self._found(lambda: self._policy.token(key, now), just_read=just_read)

    def access_token_now(self, key: bytes, now: float) -> TokenState | None:
        """None also when the models are staler than the bound: `access_token` decides."""
        bound = self._max_staleness
        if bound is not None and view_clock() - self._feed.current_at > bound:
            return None
        return self._policy.token(key, now)

    async def family_of(self, token_hash: str, *, refresh: bool) -> str | None:
        def look() -> str | None:
            if refresh:
                return self._policy.refresh_tokens.get(token_hash)
            key = bytes.fromhex(token_hash)
            state = self._policy.tokens.get(key)
            return None if state is None else self._policy.family_of(key, state)

        return await self._found(look)

    async def resource_server(self, key_hash: str) -> str | None:
        def look() -> str | None:
            server = self._directory.resource_server_hashes.get(key_hash)
            return None if server is None else server.resource_server_id

        return await self._found(look, just_read=await self._made_current())

    def connection(self, company_id: str, client_id: str) -> ConnectionState | None:
        return self._policy.connections.get((company_id, client_id))

    def family_version(self, family_id: str) -> int | None:
        return self._policy.family_version(family_id)

    def family_owner(self, family_id: str) -> tuple[str, str] | None:
        return self._policy.family_owner(family_id)

    def application_now(self, client_id: str) -> AppState | None:
        return self._policy.apps.get(client_id)

    # --- beyond the protocol core: the admin API and sign-in -------------------------

    async def admin_key(self, key_hash: str) -> AdminKey | None:
        def look() -> AdminKey | None:
            key_id = self._directory.admin_key_hashes.get(key_hash)
            return None if key_id is None else self._directory.admin_keys.get(key_id)

        return await self._found(look, just_read=await self._made_current())

    async def accounts(self, email: str) -> list[User]:
        """The live accounts of an address, one per company (none: an empty list)."""
        found = await self._found(lambda: self._directory.accounts(email) or None)
        return found or []

    async def catch_up(self) -> None:
        await self._feed.catch_up()


Observer = Callable[[Sequence[ev.Event]], None]


class LogLedger:
    """Appends to the event log; a visible record waits until this process's models have
    applied it (read-your-writes). Observers see what was recorded, once it committed
    (metrics, security log lines): one place, whichever path recorded it."""

    def __init__(
        self, eventlog: EventLog, feed: MemoryFeed, observers: Sequence[Observer] = ()
    ) -> None:
        self._eventlog = eventlog
        self._feed = feed
        self._observers = tuple(observers)

    async def record(self, record: Record, meta: Metadata, *, visible: bool = False) -> list[int]:
        positions = await self._eventlog.append(
            record.stream,
            record.expected_version,
            record.events,
            meta,
            conditions=record.conditions,
        )
        for observe in self._observers:
            observe(record.events)
        if visible:
            await self.wait_for(positions[-1])
        return positions

    async def wait_for(self, position: int) -> None:
        """Read-your-writes, but never at the price of reporting a committed change as
        failed (a new application's secret is shown once): if the log cannot be read back
        now, the models catch up when it can, and the caller hears of the commit. The whole
        wait is held to the log's bound: tries one after another, each bounded, once added
        up to three bounds behind a stalled database."""
        patience = self._eventlog.timeout or 5.0
        try:
            await within(patience, self._caught_up(position))
        except TimeoutError:
            log.warning("context.catch_up_failed", position=position, error="timed out")

    async def _caught_up(self, position: int) -> None:
        for attempt in itertools.count():
            try:
                await self._feed.wait_for(position)
                return
            except EventLogError as exc:
                log.warning("context.catch_up_failed", position=position, error=error_text(exc))
                await asyncio.sleep(0.1 * min(attempt + 1, 5))


def log_security_signals(events: Sequence[ev.Event]) -> None:
    """What an operator must see at once, as warnings: who, from where, where; never a
    credential."""
    for event in events:
        if isinstance(event, ev.IpViolationDetected):
            log.warning(
                "security.ip_violation",
                company_id=event.company_id,
                client_id=event.client_id,
                ip=event.ip,
                endpoint=event.endpoint,
                token_revoked=event.token_revoked,
            )
        elif isinstance(event, ev.OldClientSecretUsed):
            log.warning(
                "security.old_client_secret_used",
                company_id=event.company_id,
                client_id=event.client_id,
                ip=event.ip,
                secret_version=event.secret_version,
            )
