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
    if removed is not None:
        return chain.VerifyResult(result.checked, result.head, removed, result.head_hash)
    return await _rewritten(pool, result)


async def _rewritten(pool: asyncpg.Pool, result: chain.VerifyResult) -> chain.VerifyResult:
    """A tail cut and written again, once the log has grown past where it was: an intact
    chain, but a projection's checkpoint (schema.sql, projection_checkpoints_saw) or a
    model snapshot saw another event at its position than the one there now. The rewrite
    began after the highest of them below it that still sees its own event, if any."""
    rows = await pool.fetch(
        """
        SELECT w.what, w.position, e.hash, w.saw = e.hash AS same
        FROM (SELECT format('the %L checkpoint', name) AS what, position, position_hash AS saw
              FROM projection_checkpoints WHERE position_hash IS NOT NULL
              UNION
              SELECT 'a model snapshot', position, event_hash FROM model_snapshots) w
        JOIN events e ON e.position = w.position
        WHERE w.position <= $1
        ORDER BY w.position
        """,
        result.head,
    )
    changed = next((row for row in rows if not row["same"]), None)
    if changed is None:
        return result
    held = [row for row in rows if row["same"] and row["position"] < changed["position"]]
    intact, intact_hash = (held[-1]["position"], bytes(held[-1]["hash"])) if held else (0, None)
    at = changed["position"]
    reason = (
        f"the event at {at} is not the one {changed['what']} saw there: "
        f"the log was cut after {intact} and at or before {at}, and written again"
    )
    broken = chain.BrokenLink(intact + 1, reason)
    return chain.VerifyResult(result.checked, result.head, broken, intact_hash)


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
