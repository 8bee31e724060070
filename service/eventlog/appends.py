"""Group commit: the appends one batch carries, and the rows planned for them.

The writer plans a batch under the head of the chain it knows (or read under the lock):
each append is checked against the stream versions on its own, then its events get
positions, versions and hashes in order, and the rows go to `events_append_if_head` or
`events_insert` as one JSON array.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from service.eventlog import chain
from service.eventlog.records import ConcurrencyError, EventLogError, Metadata, metadata_encoder
from service.events import SCHEMA_VERSIONS, Event, encode, tenant_of, type_of


@dataclass(eq=False, slots=True)
class Append:
    stream_id: str
    expected_version: int | None
    events: Sequence[Event]
    metadata: Metadata
    conditions: Sequence[tuple[str, int]]
    future: asyncio.Future[list[int]]
    positions: list[int] = field(default_factory=list)
    error: EventLogError | None = None


@dataclass(frozen=True)
class Head:
    position: int
    hash: bytes


class Row(msgspec.Struct, gc=False):
    """One event as `events_insert` reads it (json_to_recordset)."""

    position: int
    stream_id: str
    version: int
    type: str
    schema_version: int
    company_id: str | None
    payload: msgspec.Raw
    metadata: msgspec.Raw
    hash: str  # hex


_rows_encoder = msgspec.json.Encoder()
versions_encoder = msgspec.json.Encoder()


@dataclass
class Plan:
    """The rows of one batch: positions, versions and the hash chain, as one JSON array."""

    rows: str
    count: int
    head: Head
    recorded_at: datetime
    condition_streams: frozenset[str]

    @classmethod
    def build(cls, batch: list[Append], head: Head, versions: dict[str, int]) -> Plan:
        versions = dict(versions)
        recorded_at = datetime.now(UTC)
        stamp = chain.timestamp(recorded_at)
        position, previous = head.position, head.hash
        rows: list[Row] = []
        for request in batch:
            request.positions = []
            request.error = check(request, versions)
            if request.error is not None:
                continue
            meta = metadata_encoder.encode(request.metadata)
            stream_id = request.stream_id
            for event in request.events:
                position += 1
                version = versions[stream_id] = versions[stream_id] + 1
                tag = type_of(event)
                payload = encode(event)
                schema_version = SCHEMA_VERSIONS[tag]
                tenant = tenant_of(event)
                previous = chain.event_hash(
                    previous,
                    position=position,
                    stream_id=stream_id,
                    version=version,
                    type=tag,
                    schema_version=schema_version,
                    company_id=tenant,
                    payload=payload,
                    metadata=meta,
                    recorded_at=stamp,
                )
                rows.append(
                    Row(position, stream_id, version, tag, schema_version, tenant,
                         msgspec.Raw(payload), msgspec.Raw(meta), previous.hex())
                )  # fmt: skip
                request.positions.append(position)
        text = _rows_encoder.encode(rows).decode()
        conditions = frozenset(s for r in batch for s, _ in r.conditions)
        return cls(text, len(rows), Head(position, previous), recorded_at, conditions)


def assumed_versions(batch: list[Append]) -> dict[str, int] | None:
    """The versions every stream must be at for this batch to go through as asked, or None
    when an append accepts any version (then only the real versions can tell)."""
    assumed: dict[str, int] = {}
    for request in batch:
        if request.expected_version is None:
            return None
        for stream_id, version in request.conditions:
            assumed.setdefault(stream_id, version)
        assumed.setdefault(request.stream_id, request.expected_version)
    return assumed


def check(request: Append, versions: dict[str, int]) -> EventLogError | None:
    for stream_id, expected in request.conditions:
        if versions[stream_id] != expected:
            return ConcurrencyError(stream_id, expected, versions[stream_id])
    actual = versions[request.stream_id]
    if request.expected_version is not None and actual != request.expected_version:
        return ConcurrencyError(request.stream_id, request.expected_version, actual)
    return None


def settle(request: Append, error: EventLogError | None = None) -> None:
    if request.future.done():
        return
    error = error or request.error
    if error is not None:
        request.future.set_exception(error)
    else:
        request.future.set_result(request.positions)
