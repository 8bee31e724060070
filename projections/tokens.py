"""`live_tokens`: access tokens that are neither revoked nor expired (the history keeps the
rest). Applied in batches, since token events are most of the log."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import msgspec

from service import events as ev
from service.domain import streams
from service.eventlog import RecordedEvent
from service.storage import packed as packing
from service.storage.database import Conn

# A lone token's family (`fam_` and its hash) by the primary key, any other family by the
# index of shared families, whose condition the first arm repeats (schema.sql).
_DELETE_FAMILIES = """
DELETE FROM live_tokens
WHERE (family_id = ANY($1) AND family_id <> 'fam_' || encode(token_hash, 'hex'))
   OR (token_hash = ANY($2) AND family_id = 'fam_' || encode(token_hash, 'hex'))
"""

_COLUMNS = (
    "token_hash, family_id, client_id, company_id, grant_type, permissions, issued_at, expires_at"
)
_INSERT = f"""
INSERT INTO live_tokens ({_COLUMNS})
SELECT h, f, c, co, g, ARRAY(SELECT jsonb_array_elements_text(p)), i, x
FROM unnest($1::bytea[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
            $7::timestamptz[], $8::timestamptz[]) AS u(h, f, c, co, g, p, i, x)
ON CONFLICT (token_hash) DO NOTHING
"""
_INSERT_PACKED = f"""
INSERT INTO live_tokens ({_COLUMNS})
SELECT decode(h, 'hex'), f, c, co, g, ARRAY(SELECT json_array_elements_text(p)),
       to_timestamp(i), to_timestamp(x)
FROM ROWS FROM (unnest(string_to_array($1, E'\\x1e')), unnest(string_to_array($2, E'\\x1e')),
                unnest(string_to_array($3, E'\\x1e')), unnest(string_to_array($4, E'\\x1e')),
                unnest(string_to_array($5, E'\\x1e')), json_array_elements($6::text::json),
                unnest($7::text::bigint[]), unnest($8::text::bigint[]))
     AS u(h, f, c, co, g, p, i, x)
ON CONFLICT (token_hash) DO NOTHING
"""


def _at(seconds: int | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


@dataclass
class _Row:
    family_id: str
    client_id: str
    company_id: str
    grant_type: str
    permissions: list[str]
    issued_at: int
    expires_at: int | None


@dataclass
class _Batch:
    """The net effect of a batch: rows to insert, and deletions of rows that came before."""

    inserts: dict[bytes, _Row] = field(default_factory=dict)
    families: set[str] = field(default_factory=set)
    clients: set[str] = field(default_factory=set)
    connections: set[tuple[str, str]] = field(default_factory=set)
    stripped: list[tuple[str, list[str]]] = field(default_factory=list)
    by_family: dict[str, list[bytes]] = field(default_factory=dict)

    def insert(self, token_hash: str, row: _Row) -> None:
        if row.expires_at is None or row.expires_at > time.time():
            key = bytes.fromhex(token_hash)
            self.inserts[key] = row
            self.by_family.setdefault(row.family_id, []).append(key)

    def forget_family(self, family_id: str) -> None:
        for key in self.by_family.pop(family_id, ()):
            self.inserts.pop(key, None)

    def forget_client(self, client_id: str, company_id: str | None = None) -> None:
        # rare (an application deleted, a connection revoked): a full pass is fine
        for key, row in list(self.inserts.items()):
            if row.client_id == client_id and company_id in (None, row.company_id):
                del self.inserts[key]


class TokensProjection:
    name = "tokens"
    tables = ("live_tokens",)
    lean = True  # it reads the events' own fields only
    event_types = frozenset(
        {
            "AccessTokenIssued",
            "TokenRefreshed",
            "TokenRevoked",
            "ApplicationDeleted",
            "ApplicationTokensRevoked",
            "ConnectionRevoked",
            "PermissionsChanged",
        }
    )

    async def apply(self, conn: Conn, events: Sequence[RecordedEvent]) -> None:
        batch = _Batch()
        for recorded in events:
            self._fold(batch, recorded.event)
        await self._flush(conn, batch)

    def _fold(self, batch: _Batch, e: ev.Event) -> None:
        if isinstance(e, ev.AccessTokenIssued | ev.TokenRefreshed):
            grant = e.grant_type if isinstance(e, ev.AccessTokenIssued) else "refresh_token"
            row = _Row(e.family_id, e.client_id, e.company_id, grant, list(e.permissions),
                       e.issued_at, e.expires_at)  # fmt: skip
            batch.insert(e.token_hash, row)
        elif isinstance(e, ev.TokenRevoked):
            batch.families.add(e.family_id)
            batch.forget_family(e.family_id)
        elif isinstance(e, ev.ApplicationDeleted | ev.ApplicationTokensRevoked):
            # the kill switch ends the same tokens as a deletion, and only those issued
            # before it: rows of this batch that follow it are inserted after the DELETE
            batch.clients.add(e.client_id)
            batch.forget_client(e.client_id)
        elif isinstance(e, ev.ConnectionRevoked):
            batch.connections.add((e.company_id, e.client_id))
            batch.forget_client(e.client_id, e.company_id)
        elif isinstance(e, ev.PermissionsChanged):
            removed = sorted(set(e.before) - set(e.after))
            if removed:
                batch.stripped.append((e.client_id, removed))
                for row in batch.inserts.values():
                    if row.client_id == e.client_id:
                        row.permissions = [p for p in row.permissions if p not in removed]

    async def _flush(self, conn: Conn, batch: _Batch) -> None:
        # Deletions and permission changes concern rows from earlier batches; rows of this
        # batch already had them applied in memory, so they are written last.
        if batch.families:
            families = list(batch.families)
            lone = [key for key in map(streams.lone_key, families) if key is not None]
            await conn.execute(_DELETE_FAMILIES, families, lone)
        if batch.clients:
            await conn.execute(
                "DELETE FROM live_tokens WHERE client_id = ANY($1)", list(batch.clients)
            )
        for company_id, client_id in batch.connections:
            await conn.execute(
                "DELETE FROM live_tokens WHERE company_id = $1 AND client_id = $2",
                company_id,
                client_id,
            )
        for client_id, removed in batch.stripped:
            await conn.execute(
                # keeps the order (EXCEPT would not), so batch boundaries change nothing
                "UPDATE live_tokens SET permissions = ARRAY(SELECT p FROM unnest(permissions) "
                "WITH ORDINALITY AS u(p, n) WHERE p <> ALL($2::text[]) ORDER BY n) "
                "WHERE client_id = $1",
                client_id,
                removed,
            )
        if batch.inserts:
            await self._insert(conn, batch.inserts)

    async def _insert(self, conn: Conn, inserts: dict[bytes, _Row]) -> None:
        """The rows, packed (service/storage/packed.py): each column as one text, the
        permissions as one JSON array of lists; as arrays when a text would not split
        back. Encoded as arrays, the columns took more of this process's time than the
        rest of a token's row."""
        rows = list(inserts.values())
        columns = [
            packing.texts([r.family_id for r in rows]),
            packing.texts([r.client_id for r in rows]),
            packing.texts([r.company_id for r in rows]),
            packing.texts([r.grant_type for r in rows]),
        ]
        if None not in columns:
            await conn.execute(
                _INSERT_PACKED,
                packing.clean_texts(key.hex() for key in inserts),
                *columns,
                msgspec.json.encode([r.permissions for r in rows]).decode(),
                packing.numbers(r.issued_at for r in rows),
                packing.numbers(r.expires_at for r in rows),
            )
            return
        await conn.execute(
            _INSERT,
            list(inserts),
            [r.family_id for r in rows],
            [r.client_id for r in rows],
            [r.company_id for r in rows],
            [r.grant_type for r in rows],
            # unnest() cannot take a ragged text[][]; each token's list travels as JSON
            [msgspec.json.encode(r.permissions).decode() for r in rows],
            [_at(r.issued_at) for r in rows],
            [_at(r.expires_at) for r in rows],
        )

    async def sweep_expired(self, pool: asyncpg.Pool) -> int:
        """Expired tokens leave the table (the log keeps them), so lookups stay fast."""
        status = await pool.execute(
            "DELETE FROM live_tokens WHERE expires_at IS NOT NULL AND expires_at <= now()"
        )
        return int(status.split()[-1])
