"""Auditing the log: walk the hash chain from the first event to the head."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from service.eventlog import chain


async def verify_log(pool: asyncpg.Pool, *, batch: int = 5000) -> chain.VerifyResult:
    """Verify every event in position order; reads in batches, never the whole log at once."""

    async def rows() -> AsyncIterator[Any]:
        after = 0
        while True:
            page = await pool.fetch(
                "SELECT * FROM events WHERE position > $1 ORDER BY position LIMIT $2", after, batch
            )
            for row in page:
                yield row
            if len(page) < batch:
                return
            after = page[-1]["position"]

    result = await chain.verify(rows())
    if result.broken is not None:
        return result
    removed = await _tail_removed(pool)
    if removed is None:
        return result
    return chain.VerifyResult(result.checked, result.head, removed, result.head_hash)


async def _tail_removed(pool: asyncpg.Pool) -> chain.BrokenLink | None:
    """What the database itself says of events after the head, which the chain cannot:
    a projection's checkpoint, or a model snapshot, taken at a position the log no longer
    reaches: a truncated tail, which leaves an intact chain, shorter. Read before the head,
    so an append during the walk is no alarm: positions only grow."""
    checkpoint = await pool.fetchrow(
        "SELECT name, position FROM projection_checkpoints ORDER BY position DESC LIMIT 1"
    )
    snapshot = await pool.fetchval("SELECT max(position) AS position FROM model_snapshots")
    head = int(await pool.fetchval("SELECT coalesce(max(position), 0) FROM events"))
    if checkpoint is not None and checkpoint["position"] > head:
        return chain.BrokenLink(
            head + 1,
            f"the log ends at {head}, but the {checkpoint['name']!r} checkpoint is at "
            f"{checkpoint['position']}: events after {head} were removed",
        )
    if snapshot is not None and snapshot > head:
        return chain.BrokenLink(
            head + 1,
            f"the log ends at {head}, but a model snapshot was taken at {snapshot}: "
            f"events after {head} were removed",
        )
    return None
