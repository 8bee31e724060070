"""`event_stats`: events per day and type, for ops dashboards (and a check on exactly-once:
a batch applied twice would double its counts)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from service.eventlog import RecordedEvent
from service.storage.database import Conn


class EventStatsProjection:
    name = "event_stats"
    tables = ("event_stats",)
    event_types = None

    async def apply(self, conn: Conn, events: Sequence[RecordedEvent]) -> None:
        counts = Counter((e.recorded_at.date(), e.type) for e in events)
        days, types, numbers = zip(*((d, t, n) for (d, t), n in counts.items()), strict=True)
        await conn.execute(
            """
            INSERT INTO event_stats (day, type, count)
            SELECT * FROM unnest($1::date[], $2::text[], $3::bigint[])
            ON CONFLICT (day, type) DO UPDATE SET count = event_stats.count + EXCLUDED.count
            """,
            list(days),
            list(types),
            list(numbers),
        )
