"""Group commit: the appends one batch carries, and the batch as `events_append_batch`
reads it.

The writer encodes each append's events here, outside any lock, with each event's content
digest (service/eventlog/chain.py); the database checks the versions, hands out positions
and versions and chains the digests under the lock (schema.sql), and answers per append:
its first position, or the version that did not match.

The batch travels packed (`events_append_batch_packed`, service/storage/packed.py): each of
its arrays as one text, which the database splits back into the array (600 us of the
writer's CPU for 64 one-event appends as arrays, about a fifth of a 64-append commit
cycle).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from service.eventlog import chain
from service.eventlog.records import ConcurrencyError, EventLogError, Metadata, metadata_encoder
from service.events import SCHEMA_VERSIONS, Event, encode, tenant_of, type_of
from service.storage import packed as packing


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


_encoder = msgspec.json.Encoder()
_ARGUMENTS = ", ".join(f"${n}" for n in range(1, 18))
#: the batch as arrays
APPEND = f"SELECT events_append_batch({_ARGUMENTS})"
#: the same batch, each array as one text (schema.sql)
APPEND_PACKED = f"SELECT events_append_batch_packed({_ARGUMENTS})"
#: which of events_append_batch's arrays hold text that is not JSON: stream ids, condition
#: streams, types and companies; the digests are bytes; the others hold JSON texts or
#: integers
_RAW = frozenset({0, 6, 10, 12})
_BYTES = frozenset({9})
_JSON = frozenset({13, 14})
#: per append, its first position or the version that did not match
_outcome = msgspec.json.Decoder(list[int | tuple[str, int, int]])


@dataclass
class Plan:
    """One batch, encoded: what `events_append_batch` takes (the appends and their events
    as arrays), the statement that sends it with its arguments, and what each append writes
    (to find it again if a commit's outcome is lost)."""

    arrays: tuple[Any, ...]
    statement: str
    args: tuple[Any, ...]
    recorded_at: datetime
    #: per append, its events' (payload, metadata) as stored
    written: list[list[tuple[str, str]]]
    #: the session it was sent on (pid, when it started), to end if its answer is lost
    backend: tuple[int, datetime] | None = None

    @classmethod
    def build(cls, batch: list[Append]) -> Plan:
        recorded_at = datetime.now(UTC)
        streams, expected, counts, slots = [], [], [], []
        condition_of, condition_slots, condition_streams, condition_versions = [], [], [], []
        # Each distinct stream of the batch, numbered: the database keeps its version by
        # that number while it checks the batch, not by looking the stream up among those
        # seen (quadratic in the batch: 90 ms under the lock for 2,000 appends, 42 ms now).
        numbered: dict[str, int] = {}
        stamp = _encoder.encode(chain.timestamp(recorded_at)).decode()
        event_of, digests, types, schema_versions, companies = [], [], [], [], []
        payloads, metadata = [], []
        written: list[list[tuple[str, str]]] = []
        for n, request in enumerate(batch, 1):
            request.positions, request.error = [], None
            meta = metadata_encoder.encode(request.metadata).decode()
            stream = _encoder.encode(request.stream_id).decode()
            mine: list[tuple[str, str]] = []
            for event in request.events:
                tag = type_of(event)
                payload = encode(event).decode()
                schema_version = SCHEMA_VERSIONS[tag]
                tenant = tenant_of(event)
                event_of.append(n)
                head = _encoder.encode([tag, schema_version, tenant])[1:-1].decode()
                digests.append(chain.digest_of(stream, head, payload, meta, stamp))
                types.append(tag)
                schema_versions.append(schema_version)
                companies.append(tenant)
                payloads.append(payload)
                metadata.append(meta)
                mine.append((payload, meta))
            written.append(mine)
            streams.append(request.stream_id)
            expected.append(request.expected_version)
            counts.append(len(request.events))
            slots.append(numbered.setdefault(request.stream_id, len(numbered) + 1))
            for stream_id, version in request.conditions:
                condition_of.append(n)
                condition_slots.append(numbered.setdefault(stream_id, len(numbered) + 1))
                condition_streams.append(stream_id)
                condition_versions.append(version)
        arrays = (streams, expected, counts, slots, condition_of, condition_slots,
                  condition_streams, condition_versions, event_of,
                  b"".join(digests), types, schema_versions, companies,
                  payloads, metadata, recorded_at)  # fmt: skip
        packed = _packed(arrays)
        if packed is None:
            return cls(arrays, APPEND, arrays, recorded_at, written)
        return cls(arrays, APPEND_PACKED, packed, recorded_at, written)

    def apply(self, batch: list[Append], outcome: str) -> None:
        """What `events_append_batch` answered, onto each append: its positions, or the
        ConcurrencyError that kept it out of the log."""
        for request, result in zip(batch, _outcome.decode(outcome), strict=True):
            if isinstance(result, int):
                request.positions = list(range(result, result + len(request.events)))
            else:
                request.error = ConcurrencyError(*result)


def _packed(arrays: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Each array as one text (service/storage/packed.py); None when a raw text would not
    split back into its elements, and the batch goes as arrays."""
    packed: list[Any] = []
    for n, array in enumerate(arrays[:-1]):
        if n in _RAW:
            text = packing.texts(array)
            if text is None:
                return None
            packed.append(text)
        elif n in _BYTES:
            packed.append(array)
        else:
            packed.append(packing.clean_texts(array) if n in _JSON else packing.numbers(array))
    packed.append(arrays[-1])
    return tuple(packed)


def settle(request: Append, error: EventLogError | None = None) -> None:
    if request.future.done():
        return
    error = error or request.error
    if error is not None:
        request.future.set_exception(error)
    else:
        request.future.set_result(request.positions)
