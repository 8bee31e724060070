"""`event_stats`: events per day (UTC) and type, for ops dashboards (and a check on
exactly-once: a range applied twice would double its counts). Counted by the database over
a range of the log: no event is read into the process, and an event of a type or shape
this version cannot read is counted like any other."""

from __future__ import annotations

from service.storage.database import Conn


class EventStatsProjection:
    name = "event_stats"
    tables = ("event_stats",)

    async def apply_range(self, conn: Conn, after: int, until: int) -> None:
        await conn.execute(
            """
            INSERT INTO event_stats (day, type, count)
            SELECT (recorded_at AT TIME ZONE 'UTC')::date, type, count(*)
            FROM events WHERE position > $1 AND position <= $2
            GROUP BY 1, 2
            ON CONFLICT (day, type) DO UPDATE SET count = event_stats.count + EXCLUDED.count
            """,
            after,
            until,
        )
