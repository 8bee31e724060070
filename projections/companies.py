"""`companies`, `users` and `admin_keys`: who belongs to which company (no secrets)."""

from __future__ import annotations

from collections.abc import Sequence

from service import events as ev
from service.eventlog import RecordedEvent
from service.storage.database import Conn


class CompaniesProjection:
    name = "companies"
    tables = ("companies", "users", "admin_keys")
    lean = False
    event_types = frozenset(
        {
            "CompanyCreated",
            "UserAdded",
            "UserRoleChanged",
            "UserRemoved",
            "AdminKeyIssued",
            "AdminKeyRevoked",
        }
    )

    async def apply(self, conn: Conn, events: Sequence[RecordedEvent]) -> None:
        for recorded in events:
            await self._apply_one(conn, recorded)

    async def _apply_one(self, conn: Conn, recorded: RecordedEvent) -> None:
        e, at = recorded.event, recorded.recorded_at
        if isinstance(e, ev.CompanyCreated):
            await conn.execute(
                "INSERT INTO companies (company_id, name, created_at) VALUES ($1, $2, $3)",
                e.company_id,
                e.name,
                at,
            )
        elif isinstance(e, ev.UserAdded):
            await conn.execute(
                "INSERT INTO users (user_id, company_id, email, role, created_at) "
                "VALUES ($1, $2, $3, $4, $5)",
                e.user_id,
                e.company_id,
                e.email,
                e.role,
                at,
            )
        elif isinstance(e, ev.UserRoleChanged):
            await conn.execute("UPDATE users SET role = $2 WHERE user_id = $1", e.user_id, e.after)
        elif isinstance(e, ev.UserRemoved):
            await conn.execute("UPDATE users SET removed_at = $2 WHERE user_id = $1", e.user_id, at)
        elif isinstance(e, ev.AdminKeyIssued):
            await conn.execute(
                "INSERT INTO admin_keys (key_id, company_id, label, issued_by, issued_at) "
                "VALUES ($1, $2, $3, $4, $5)",
                e.key_id,
                e.company_id,
                e.label,
                recorded.metadata.actor,
                at,
            )
        elif isinstance(e, ev.AdminKeyRevoked):
            await conn.execute(
                "UPDATE admin_keys SET revoked_at = $2 WHERE key_id = $1", e.key_id, at
            )
