"""A company's event history, read page by page from the log: shared by GET /admin/events
and `tollgate events`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import asyncpg
import msgspec

from projections.directory import DirectoryModel
from service import events as ev
from service.domain import streams
from service.eventlog import RecordedEvent, to_recorded

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_POSITION = 2**63 - 1  # bigint
MAX_STREAM_LENGTH = 500
_DIGITS = re.compile(r"^[0-9]{1,19}\Z")

#: Changes that people make (applications, users, keys, connections): the dashboard's
#: "recent changes" and the `v_admin_changes` view (schema.sql) list these types.
CHANGE_TYPES: tuple[str, ...] = (
    "ApplicationCreated", *(cls.__name__ for cls in ev.APPLICATION_SETTINGS),
    "ClientSecretRotated", "ApplicationDeleted", "ApplicationTokensRevoked", "ClientKeyAdded",
    "ClientKeyRemoved", "UserAdded", "UserRoleChanged", "UserPasswordChanged", "UserRemoved",
    "AdminKeyIssued", "AdminKeyRevoked", "ConnectionGranted", "ConnectionRevoked",
)  # fmt: skip

#: Payload fields never shown: an argon2id hash is not a password, but a low-entropy
#: password can be guessed from it offline, so readers of the history do not get it.
REDACTED_FIELDS = frozenset({"password_hash"})
REDACTED = "[redacted]"

_COLUMNS = (
    "position, stream_id, version, type, schema_version, company_id, payload, metadata, "
    "recorded_at, hash"
)


#: "company_id is $n", written so that PostgreSQL walks the (company_id, position) index.
#: With `company_id = $n` the planner drops company_id from the ORDER BY (a constant) and a
#: generic plan, which asyncpg's prepared statements get after five runs, may walk the
#: primary key from `after` instead, filtering: for a small company in a long log that
#: reads the whole log for one page (measured: 300,000 rows for 15). The range keeps
#: company_id in the ORDER BY, which only that index provides, so a page reads about
#: `limit` of the company's own rows. (With deterministic collations, the default,
#: `x >= y AND x <= y` holds exactly when x = y.)
COMPANY_IS = "company_id >= ${n} AND company_id <= ${n}"


class HistoryError(ValueError):
    """A query parameter that cannot be used; `parameter` names it."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


@dataclass(frozen=True)
class Query:
    """Events after `after`, in position order, at most `limit`; `company_id` None is the
    whole log (operators only)."""

    company_id: str | None
    after: int = 0
    limit: int = DEFAULT_LIMIT
    type: str | None = None
    stream: str | None = None


def parse(params: Mapping[str, str | None], company_id: str | None) -> Query:
    """Validate query parameters given as text (`None`: not given)."""
    after = _integer(params.get("after"), "after", 0, MAX_POSITION, default=0)
    limit = _integer(params.get("limit"), "limit", 1, MAX_LIMIT, default=DEFAULT_LIMIT)
    type_ = params.get("type")
    if type_ is not None and type_ not in ev.BY_TAG:
        raise HistoryError("type", f"unknown event type {type_[:100]!r}")
    stream = params.get("stream")
    if stream is not None and not 1 <= len(stream) <= MAX_STREAM_LENGTH:
        raise HistoryError("stream", f"must be 1 to {MAX_STREAM_LENGTH} characters")
    if stream is not None and not stream.isprintable():
        raise HistoryError("stream", "must not contain control characters")
    return Query(company_id, after, limit, type_, stream)


def _integer(value: str | None, name: str, low: int, high: int, *, default: int) -> int:
    if value is None:
        return default
    if not _DIGITS.match(value) or not low <= int(value) <= high:
        raise HistoryError(name, f"must be an integer from {low} to {high}")
    return int(value)


async def read(pool: asyncpg.Pool, query: Query) -> list[dict[str, Any]]:
    """One page, in position order."""
    sql, args = statement(query)
    rows = await pool.fetch(sql, *args)
    return [item(to_recorded(row, readable_only=False)) for row in rows]


def statement(query: Query) -> tuple[str, list[Any]]:
    """The SQL of one page and its parameters; every value goes in as a parameter."""
    clauses = ["position > $1"]
    args: list[Any] = [query.after, query.limit]
    order = "position"
    if query.company_id is not None:
        args.append(query.company_id)
        clauses.append(COMPANY_IS.format(n=len(args)))
        order = "company_id, position"
    for column, value in (("type", query.type), ("stream_id", query.stream)):
        if value is not None:
            args.append(value)
            clauses.append(f"{column} = ${len(args)}")
    where = " AND ".join(clauses)
    return f"SELECT {_COLUMNS} FROM events WHERE {where} ORDER BY {order} LIMIT $2", args


def next_after(items: list[dict[str, Any]]) -> int | None:
    """The cursor for the next page: the last position returned (None: an empty page)."""
    return int(items[-1]["position"]) if items else None


def payload_of(recorded: RecordedEvent) -> dict[str, Any]:
    """The event's fields in their current shape (old shapes were upcast on read)."""
    if isinstance(recorded.event, ev.UnknownEvent):
        # Nothing of it is shown unread: it may hold a field that must be redacted.
        return {"unreadable": "written by a newer version of Tollgate, or altered"}
    payload: dict[str, Any] = msgspec.to_builtins(recorded.event)
    payload.pop("type", None)  # the tag: already the item's `type`
    for field in REDACTED_FIELDS & payload.keys():
        payload[field] = REDACTED
    return payload


def item(recorded: RecordedEvent) -> dict[str, Any]:
    meta = recorded.metadata
    return {
        "position": recorded.position,
        "stream": recorded.stream_id,
        "version": recorded.version,
        "type": recorded.type,
        "recorded_at": recorded.recorded_at.astimezone(UTC).isoformat(),
        "actor": meta.actor,
        "request_id": meta.request_id,
        "client_ip": meta.client_ip,
        "causation": meta.causation,
        "payload": payload_of(recorded),
    }


#: the company each application belongs to, from its first event (deleted ones too)
_OWNERS = (
    "SELECT stream_id, company_id FROM events WHERE stream_id = ANY($1::text[]) AND version = 1"
)


async def seen_by(
    pool: asyncpg.Pool, directory: DirectoryModel, company_id: str, items: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`items` as the company's admins see them: the address and the id of a request made
    by another company's application, user or admin key are not theirs (a connection's
    tokens are the connecting company's events, asked for by the publisher's servers). A
    token refused at the gateway or at /policy/check was sent by whoever holds it: the
    request is its application's. The system's and the command line's are shown. One
    index probe per page for the applications named."""
    clients = [_client_of(shown) for shown in items]
    owners: dict[str, str | None] = {}
    if named := {c for c in clients if c is not None}:
        rows = await pool.fetch(_OWNERS, [streams.application(c) for c in named])
        owners = {r["stream_id"].removeprefix("application-"): r["company_id"] for r in rows}
    for shown, client in zip(items, clients, strict=True):
        kind, _, ident = (shown["actor"] or "system").partition(":")
        if client is not None:
            owner = owners.get(client)
        elif kind == "user":
            owner = user.company_id if (user := directory.users.get(ident)) else None
        elif kind == "admin_key":
            owner = key.company_id if (key := directory.admin_keys.get(ident)) else None
        else:
            continue
        if owner != company_id:
            shown["client_ip"] = shown["request_id"] = None
            payload = shown["payload"]
            if "ip" in payload and not _a_violation(shown):  # a reuse's: the same address
                payload["ip"] = None
    return items


def _a_violation(shown: dict[str, Any]) -> bool:
    """Whether the item is a violation, whose address (outside the application's allow
    list) is what it is about."""
    if shown["type"] == "IpViolationDetected":
        return True
    return bool(shown["payload"].get("reason") == "ip_violation")


#: actors that check a token someone else sent: the request is the token's application's
_TOKEN_CHECKERS = frozenset({"gateway", "resource_server"})


def _client_of(shown: dict[str, Any]) -> str | None:
    """The application whose request an item records, if an application's."""
    kind, _, ident = (shown["actor"] or "system").partition(":")
    if kind == "client":
        return ident
    if kind in _TOKEN_CHECKERS:
        client = shown["payload"].get("client_id")
        return client if isinstance(client, str) else None
    return None


async def company_known(pool: asyncpg.Pool, company_id: str) -> bool:
    """Whether the log holds any event of this company (one index probe)."""
    found = await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM events WHERE company_id = $1)", company_id
    )
    return bool(found)
