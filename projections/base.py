"""What a projection is: a name, the event types it reads, and how it applies a batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from service.eventlog import RecordedEvent
from service.storage.database import Conn


class SqlProjection(Protocol):
    """Rows in PostgreSQL tables, written in the same transaction as the checkpoint."""

    @property
    def name(self) -> str: ...

    @property
    def tables(self) -> tuple[str, ...]:
        """The tables it owns (emptied on rebuild)."""
        ...

    @property
    def event_types(self) -> frozenset[str] | None:
        """The event types it reads; None: all of them."""
        ...

    @property
    def lean(self) -> bool:
        """Whether it reads only position, version, type and the event (EventLog.read_all's
        `lean`): no stream, tenant, metadata, time or hash."""
        ...

    async def apply(self, conn: Conn, events: Sequence[RecordedEvent]) -> None:
        """Apply a batch of events, in order, inside the caller's transaction."""
        ...


@runtime_checkable
class SqlRangeProjection(Protocol):
    """Rows the database computes itself from a range of the log, in the same transaction
    as the checkpoint: no event travels to the process."""

    @property
    def name(self) -> str: ...

    @property
    def tables(self) -> tuple[str, ...]: ...

    async def apply_range(self, conn: Conn, after: int, until: int) -> None:
        """Apply the events at positions (after, until], inside the caller's transaction."""
        ...


#: what the runner runs
Projection = SqlProjection | SqlRangeProjection


class MemoryProjection(Protocol):
    """State held in the process, rebuilt from the log at every start."""

    @property
    def name(self) -> str: ...

    @property
    def event_types(self) -> frozenset[str] | None: ...

    def apply(self, events: Sequence[RecordedEvent]) -> None: ...
