"""What command handlers work with: the log, the in-memory models, the configuration."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import asyncpg
import structlog

from projections.directory import DirectoryModel
from projections.feed import MemoryFeed
from projections.memory import PolicyModel
from service.errors import Unauthorized
from service.eventlog import ConcurrencyError, EventLog, EventLogError, Metadata
from service.events import Event
from service.metrics import Metrics
from service.settings import Settings

log = structlog.get_logger(__name__)


@dataclass
class Context:
    settings: Settings
    pool: asyncpg.Pool
    eventlog: EventLog
    feed: MemoryFeed
    policy: PolicyModel
    directory: DirectoryModel
    catalogue: Mapping[str, str]
    #: this process's counters (None outside the web server)
    metrics: Metrics | None = None

    def count(self, name: str, label: str | None = None) -> None:
        """Move a counter of the Metrics API if there is one: count("token_issued", grant)."""
        if self.metrics is not None:
            method = getattr(self.metrics, name)
            method() if label is None else method(label)

    async def record(
        self,
        stream_id: str,
        expected_version: int | None,
        events: Sequence[Event],
        metadata: Metadata,
        *,
        conditions: Sequence[tuple[str, int]] = (),
    ) -> list[int]:
        """Append, then wait until this process's models have applied it, so the next
        request here sees the change (read-your-writes).

        A change made with an admin key holds only while the key does: the append is
        conditional on the key's stream being at version 1 (issued, not revoked), so a
        revocation that committed first, in any process, refuses it however stale this
        process's view of the keys is."""
        key_stream = _admin_key_stream(metadata.actor)
        if key_stream is not None:
            conditions = [*conditions, (key_stream, 1)]
        try:
            positions = await self.eventlog.append(
                stream_id, expected_version, events, metadata, conditions=conditions
            )
        except ConcurrencyError as exc:
            if key_stream is not None and exc.stream_id == key_stream:
                raise Unauthorized("unknown or revoked admin key", realm="tollgate-admin") from None
            raise
        await self._catch_up_to(positions[-1])
        return positions

    async def _catch_up_to(self, position: int) -> None:
        """Read-your-writes, but never at the price of reporting a committed change as
        failed (a new application's secret is shown once): if the log cannot be read back
        now, the models catch up when it can, and the caller hears of the commit."""
        for attempt in range(3):
            try:
                await self.feed.wait_for(position)
                return
            except EventLogError as exc:
                log.warning("context.catch_up_failed", position=position, error=str(exc))
                await asyncio.sleep(0.1 * (attempt + 1))

    async def refresh(self) -> None:
        """Catch up with what other processes wrote (a lookup missed; look again)."""
        await self.feed.catch_up()


def _admin_key_stream(actor: str) -> str | None:
    prefix = "admin_key:"
    return f"admin-key-{actor[len(prefix) :]}" if actor.startswith(prefix) else None
