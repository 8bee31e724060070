"""The hash chain over the event log: what each event's `hash` covers, and its verification.

hash(n) = SHA-256(hash(n-1) || canonical(n)), where canonical(n) is a JSON array of the
event's position, stream, version, type, schema version, tenant, payload and metadata (the
exact JSON stored, keys sorted) and recorded time. Positions are dense, so a deleted event
shows up as a gap, a changed or moved event as a hash that no longer matches.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

GENESIS = bytes(32)

_canonical = msgspec.json.Encoder(order="sorted")


def timestamp(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def event_hash(
    previous: bytes,
    *,
    position: int,
    stream_id: str,
    version: int,
    type: str,
    schema_version: int,
    company_id: str | None,
    payload: bytes,
    metadata: bytes,
    recorded_at: str,
) -> bytes:
    """`recorded_at` is the ISO 8601 form with microseconds (see `timestamp`)."""
    body = _canonical.encode(
        [
            position,
            stream_id,
            version,
            type,
            schema_version,
            company_id,
            msgspec.Raw(payload),
            msgspec.Raw(metadata),
            recorded_at,
        ]
    )
    return hashlib.sha256(previous + body).digest()


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


async def verify(rows: AsyncIterator[Any]) -> VerifyResult:
    """Walk rows (position order, all columns of `events`) and name the first broken link."""
    previous = GENESIS
    expected_position = 1
    checked = 0
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
        digest = event_hash(
            previous,
            position=position,
            stream_id=row["stream_id"],
            version=row["version"],
            type=row["type"],
            schema_version=row["schema_version"],
            company_id=row["company_id"],
            payload=row["payload"].encode(),
            metadata=row["metadata"].encode(),
            recorded_at=timestamp(row["recorded_at"]),
        )
        if digest != bytes(row["hash"]):
            reason = "content does not match its hash (changed, or moved from another position)"
            return VerifyResult(checked, position, BrokenLink(position, reason), previous)
        previous = digest
        expected_position += 1
        checked += 1
    return VerifyResult(checked, expected_position - 1, None, previous if checked else None)
