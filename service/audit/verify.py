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

    return await chain.verify(rows())
