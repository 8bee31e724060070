"""What the event log stores and raises: event metadata, recorded events, errors."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from service.events import Event, UnknownEventType, decode, decode_or_unknown


class Metadata(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Who, from where, and why: recorded with every event."""

    actor: str = "system"  # "user:<id>", "admin_key:<id>", "client:<id>", "system"
    request_id: str | None = None
    client_ip: str | None = None
    causation: int | None = None  # position of the event that caused this one


metadata_encoder = msgspec.json.Encoder(order="sorted")
metadata_decoder = msgspec.json.Decoder(Metadata)


NO_METADATA = Metadata()
EPOCH = datetime.fromtimestamp(0, UTC)


class RecordedEvent(msgspec.Struct, frozen=True, gc=False):
    position: int
    stream_id: str
    version: int
    type: str
    schema_version: int
    company_id: str | None
    event: Event
    metadata: Metadata
    recorded_at: datetime
    hash: bytes


def lean_recorded(
    position: int, version: int, tag: str, schema_version: int, event: Event
) -> RecordedEvent:
    """What a lean read gives (EventLog.read_all): what the in-memory models use, no more;
    stream and tenant empty, metadata, time and hash as NO_METADATA, EPOCH and b""."""
    return RecordedEvent(
        position, "", version, tag, schema_version, None, event, NO_METADATA, EPOCH, b""
    )


class EventLogError(Exception):
    """Base of the errors raised by the event log."""


class ConcurrencyError(EventLogError):
    """A stream (or a condition stream) was not at the expected version; nothing written."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id!r} is at version {actual}, expected {expected}")
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class EventLogRefused(EventLogError):
    """The database refused a value (a NUL character in text, say); nothing written."""


class EventLogUnavailable(EventLogError):
    """The database could not be reached, or failed the write for a reason of its own."""


def to_recorded(row: Any, *, readable_only: bool = True) -> RecordedEvent:
    """A stored row as a RecordedEvent. `readable_only`: an event this version cannot read
    raises (projections must stop before it); otherwise it comes back as UnknownEvent
    (for showing history)."""
    read = decode if readable_only else decode_or_unknown
    try:
        event = read(row["type"], row["schema_version"], row["payload"])
    except (UnknownEventType, msgspec.DecodeError, msgspec.ValidationError) as exc:
        # Named with its place in the log, whatever the decoder found wrong with it.
        unread = f"{row['type']} (schema version {row['schema_version']})"
        why = "" if isinstance(exc, UnknownEventType) else f": {exc}"  # newer, or not its shape
        raise UnknownEventType(
            f"{unread} at position {row['position']} cannot be read by this version{why}"
        ) from None
    return RecordedEvent(
        position=row["position"],
        stream_id=row["stream_id"],
        version=row["version"],
        type=row["type"],
        schema_version=row["schema_version"],
        company_id=row["company_id"],
        event=event,
        metadata=metadata_decoder.decode(row["metadata"]),
        recorded_at=row["recorded_at"],
        hash=bytes(row["hash"]),
    )
