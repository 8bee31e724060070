"""How many attempts a violation email covers: the one that triggered it, and those counted
since the previous email about the same application and address (IpViolationsCoalesced,
see service/alerts.py), which were recorded but not mailed one by one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from service.events import IpViolationDetected

# Bounded by the previous IpViolationDetected of the pair (each email is triggered by one),
# so consecutive emails count disjoint stretches of the log: every summary is reported once.
# Both scans are on (company_id, position), the events table's tenant index.
_EARLIER = """
WITH previous AS (
    SELECT coalesce(max(e.position), 0) AS position FROM events e
    WHERE e.company_id = $1 AND e.position < $4 AND e.type = 'IpViolationDetected'
      AND e.payload ->> 'client_id' = $2 AND e.payload ->> 'ip' = $3)
SELECT coalesce(sum((e.payload ->> 'count')::bigint), 0) AS count,
       min((e.payload ->> 'first_at')::double precision) AS first_at,
       max((e.payload ->> 'last_at')::double precision) AS last_at
FROM events e, previous
WHERE e.company_id = $1 AND e.position > previous.position AND e.position < $4
  AND e.type = 'IpViolationsCoalesced'
  AND e.payload ->> 'client_id' = $2 AND e.payload ->> 'ip' = $3
"""


@dataclass(frozen=True)
class Earlier:
    """Attempts counted, not mailed, since the previous email about this pair."""

    count: int
    first_at: datetime
    last_at: datetime


async def earlier_attempts(
    pool: asyncpg.Pool, violation: IpViolationDetected, position: int
) -> Earlier | None:
    """The same answer on every resend: only events before the violation count."""
    row = await pool.fetchrow(
        _EARLIER, violation.company_id, violation.client_id, violation.ip, position
    )
    if row is None or not row["count"]:
        return None
    return Earlier(
        int(row["count"]),
        datetime.fromtimestamp(float(row["first_at"]), UTC),
        datetime.fromtimestamp(float(row["last_at"]), UTC),
    )
