"""The `applications` table: every live application, as a dashboard or SQL user reads it."""

from __future__ import annotations

from collections.abc import Sequence

from service import events as ev
from service.eventlog import RecordedEvent
from service.storage.database import Conn

# Settings changes: event type → the column `after` sets (its setting's name).
_CHANGES: dict[type[ev.Event], str] = {
    cls: name for cls, (name, _label) in ev.APPLICATION_SETTINGS.items()
}


class ApplicationsProjection:
    name = "applications"
    tables = ("applications",)
    lean = False
    event_types = frozenset(
        {
            "ApplicationCreated",
            "ClientSecretRotated",
            "ApplicationDeleted",
            "ApplicationTokensRevoked",
            "ClientKeyAdded",
            "ClientKeyRemoved",
            *(cls.__name__ for cls in _CHANGES),
        }
    )

    async def apply(self, conn: Conn, events: Sequence[RecordedEvent]) -> None:
        for recorded in events:
            await self._apply_one(conn, recorded)

    async def _apply_one(self, conn: Conn, recorded: RecordedEvent) -> None:
        event = recorded.event
        at, version = recorded.recorded_at, recorded.version
        if isinstance(event, ev.ApplicationCreated):
            await conn.execute(
                """
                INSERT INTO applications (client_id, company_id, name, grant_type, redirect_uri,
                    ip_allowlist, permissions, notification_emails, secret_version,
                    created_at, updated_at, version)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $9, $10)
                """,
                event.client_id,
                event.company_id,
                event.name,
                event.grant_type,
                event.redirect_uri,
                event.ip_allowlist,
                event.permissions,
                event.notification_emails,
                at,
                version,
            )
        elif isinstance(event, ev.ClientSecretRotated):
            await conn.execute(
                "UPDATE applications SET secret_version = $2, updated_at = $3, version = $4 "
                "WHERE client_id = $1",
                event.client_id,
                event.secret_version,
                at,
                version,
            )
        elif isinstance(event, ev.ApplicationDeleted):
            await conn.execute("DELETE FROM applications WHERE client_id = $1", event.client_id)
        elif isinstance(event, ev.ApplicationTokensRevoked):
            # nothing the table shows changes, but the stream moved: `version` follows it,
            # so the table's version is the one an If-Match must name
            await conn.execute(
                "UPDATE applications SET version = $2 WHERE client_id = $1",
                event.client_id,
                version,
            )
        elif isinstance(event, ev.ClientKeyAdded | ev.ClientKeyRemoved):
            # the key ids only: the keys themselves are in the log
            operation = "array_append" if isinstance(event, ev.ClientKeyAdded) else "array_remove"
            await conn.execute(
                f"UPDATE applications SET client_key_ids = {operation}(client_key_ids, $2), "
                "updated_at = $3, version = $4 WHERE client_id = $1",
                event.client_id,
                event.kid,
                at,
                version,
            )
        elif (column := _CHANGES.get(type(event))) is not None:
            await conn.execute(
                f"UPDATE applications SET {column} = $2, updated_at = $3, version = $4 "
                "WHERE client_id = $1",
                event.client_id,  # type: ignore[attr-defined]
                event.after,  # type: ignore[attr-defined]
                at,
                version,
            )
