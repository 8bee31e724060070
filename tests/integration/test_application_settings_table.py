"""Every application setting (service.events.APPLICATION_SETTINGS) has its column in the
`applications` table, which the SQL projection sets from the setting's events."""

from __future__ import annotations

from service import events as ev


async def test_every_setting_has_its_column(db):
    columns = {
        row["column_name"]
        for row in await db.pool.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'applications'"
        )
    }
    assert {name for name, _label in ev.APPLICATION_SETTINGS.values()} <= columns
