"""The hash chain over the event log: what each event's `hash` covers, and its verification.

hash(n) = SHA-256(hash(n-1) || position(n) || version(n) || digest(n)), the position as 8
bytes and the version as 4 (big-endian, as PostgreSQL's int8send and int4send write them),
and digest(n) = SHA-256(content(n)), where content(n) is a JSON array of the event's
stream, type, schema version, tenant, payload and metadata (the exact JSON stored) and
recorded time. Positions are dense, so a deleted event shows up as a gap, a changed or
moved event as a hash that no longer matches.

The writer computes each digest before it appends (service/eventlog/appends.py), so that
under the writers' lock the database hashes 76 bytes an event, not all the event holds.
Events written before that chained the whole of it: hash(n) = SHA-256(hash(n-1) ||
canonical(n)), canonical(n) being content(n) with the position before the stream and the
version after it (`event_hash_whole`). A link holds if it is either; each commits to the
previous hash and all of the event, so neither can be forged without breaking SHA-256.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import msgspec

GENESIS = bytes(32)

_canonical = msgspec.json.Encoder(order="sorted")


def timestamp(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def link(previous: bytes, position: int, version: int, digest: bytes) -> bytes:
    """The hash of the event at `position` and `version` whose content has `digest`."""
    at = position.to_bytes(8, "big", signed=True) + version.to_bytes(4, "big", signed=True)
    return hashlib.sha256(previous + at + digest).digest()


class Content(NamedTuple):
    """What an event's digest covers. `recorded_at` is the ISO 8601 form with microseconds
    (see `timestamp`); `payload` and `metadata` the exact JSON stored."""

    stream_id: str
    type: str
    schema_version: int
    company_id: str | None
    payload: bytes
    metadata: bytes
    recorded_at: str

    def encoded(self, *, at: tuple[int, int] | None = None) -> bytes:
        """As a JSON array; `at` (position, version): the whole event's form, the position
        before the stream and the version after it."""
        head = [self.stream_id] if at is None else [at[0], self.stream_id, at[1]]
        return _canonical.encode([
            *head, self.type, self.schema_version, self.company_id, msgspec.Raw(self.payload),
            msgspec.Raw(self.metadata), self.recorded_at,
        ])  # fmt: skip


def digest_of(stream: str, head: str, payload: str, metadata: str, recorded_at: str) -> bytes:
    """The digest of content already encoded in parts, as a writer has it: `stream` and
    `recorded_at` as JSON strings, `head` the type, schema version and tenant as JSON
    without the brackets, `payload` and `metadata` the JSON stored; the bytes of
    `Content.encoded`, without encoding the fields again."""
    return hashlib.sha256(f"[{stream},{head},{payload},{metadata},{recorded_at}]".encode()).digest()


def event_hash(previous: bytes, position: int, version: int, content: Content) -> bytes:
    return link(previous, position, version, hashlib.sha256(content.encoded()).digest())


def event_hash_whole(previous: bytes, position: int, version: int, content: Content) -> bytes:
    """The hash as events written before the digests were chained: over all they hold."""
    return hashlib.sha256(previous + content.encoded(at=(position, version))).digest()


@dataclass(frozen=True)
class BrokenLink:
    position: int
    reason: str

    def __str__(self) -> str:
        return f"position {self.position}: {self.reason}"


@dataclass(frozen=True)
class VerifyResult:
    checked: int
    head: int
    broken: BrokenLink | None
    #: hash of the last good event: record it elsewhere to anchor the chain
    head_hash: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None


def stored_content(row: Any) -> Content:
    """The content of a row of `events` (a record with its columns)."""
    return Content(
        row["stream_id"], row["type"], row["schema_version"], row["company_id"],
        row["payload"].encode(), row["metadata"].encode(), timestamp(row["recorded_at"]),
    )  # fmt: skip


async def verify(rows: AsyncIterator[Any]) -> VerifyResult:
    """Walk rows (position order, all columns of `events`) and name the first broken link."""
    previous = GENESIS
    expected_position = 1
    checked = 0
    forms = (event_hash, event_hash_whole)
    async for row in rows:
        position = row["position"]
        if position != expected_position:
            if position > expected_position:
                missing = (
                    f"event {expected_position} is missing"
                    if position == expected_position + 1
                    else f"events {expected_position}..{position - 1} are missing"
                )
            else:
                missing = f"position {position} appears out of order"
            broken = BrokenLink(expected_position, missing)
            return VerifyResult(checked, position, broken, previous)
        version, content = row["version"], stored_content(row)
        stored = bytes(row["hash"])
        first, second = forms  # the previous link's form first: most logs need one
        digest = first(previous, position, version, content)
        if digest != stored:
            digest = second(previous, position, version, content)
            if digest != stored:
                reason = "content does not match its hash (changed, or moved from another position)"
                return VerifyResult(checked, position, BrokenLink(position, reason), previous)
            forms = (second, first)
        previous = digest
        expected_position += 1
        checked += 1
    return VerifyResult(checked, expected_position - 1, None, previous if checked else None)
