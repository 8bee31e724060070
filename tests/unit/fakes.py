"""An event log in memory, with the real one's contract (stream versions, conditions,
positions in append order), so the unit tier runs the production wiring of the protocol
core, read models and ledger included, with no database."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from projections.directory import DirectoryModel
from projections.feed import MemoryFeed
from projections.memory import PolicyModel
from service.adapters import LogLedger, ModelLookups
from service.eventlog import Announced, Appended, ConcurrencyError, Metadata, RecordedEvent, Wakeup
from service.events import SCHEMA_VERSIONS, Event, tenant_of, type_of


class InMemoryEventLog:
    def __init__(self) -> None:
        self.events: list[RecordedEvent] = []
        self.versions: dict[str, int] = {}
        self.wakeup = Wakeup()
        self.poll_interval = 0.05
        self.timeout: float | None = None  # as EventLog: how long a wait on the log may last
        self.appended: list[Appended] = []  # as EventLog: told of each append as it commits
        self.announced: list[Announced] = []  # as EventLog; nothing else writes here
        self.heard: list[Callable[[float, int], object]] = []  # no listener: never called

    async def append(
        self,
        stream_id: str,
        expected_version: int | None,
        events: Sequence[Event],
        metadata: Metadata | None = None,
        *,
        conditions: Sequence[tuple[str, int]] = (),
    ) -> list[int]:
        await asyncio.sleep(0)  # a real append yields to the loop too
        for stream, version in conditions:
            if self.versions.get(stream, 0) != version:
                raise ConcurrencyError(stream, version, self.versions.get(stream, 0))
        actual = self.versions.get(stream_id, 0)
        if expected_version is not None and actual != expected_version:
            raise ConcurrencyError(stream_id, expected_version, actual)
        positions = []
        for event in events:
            actual += 1
            tag = type_of(event)
            self.events.append(
                RecordedEvent(
                    len(self.events) + 1, stream_id, actual, tag, SCHEMA_VERSIONS[tag],
                    tenant_of(event), event, metadata or Metadata(), datetime.now(UTC), b"",
                )
            )  # fmt: skip
            positions.append(len(self.events))
        self.versions[stream_id] = actual
        for hook in self.appended:
            hook(positions, expected_version, events)
        self.wakeup.notify(positions[-1])
        return positions

    async def read_all(
        self,
        after: int = 0,
        limit: int = 1000,
        *,
        types: Sequence[str] | None = None,
        until: int | None = None,
        lean: bool = False,
    ) -> list[RecordedEvent]:
        found = [
            e
            for e in self.events[after:]
            if (types is None or e.type in types) and (until is None or e.position <= until)
        ]
        return found[:limit]

    async def head(self) -> int:
        return len(self.events)

    def of_type(self, kind: type[Event]) -> list[Event]:
        return [e.event for e in self.events if isinstance(e.event, kind)]


class Wiring:
    """The read models, lookups and ledger over an in-memory log, as create_app wires them
    over PostgreSQL."""

    def __init__(self) -> None:
        self.log = InMemoryEventLog()
        self.policy = PolicyModel()
        self.directory = DirectoryModel()
        self.feed = MemoryFeed(self.log, [self.policy, self.directory])  # type: ignore[arg-type]
        self.lookups = ModelLookups(self.feed, self.policy, self.directory)
        self.ledger = LogLedger(self.log, self.feed)  # type: ignore[arg-type]
