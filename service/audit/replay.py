"""Replaying the log: applications, connections and live tokens as they were at a moment.

The state is rebuilt from the events alone, by the same in-memory model the token
endpoint decides from (`projections.memory.PolicyModel`), applied to a prefix of the log.
A replay "until" a position stops after that event; one "until" a timestamp stops before
the first event recorded after it, so it never includes an event recorded later, even if
two hosts' clocks disagreed. A token counts as live when it had not expired at the replay
moment (the time of the last event replayed, or the timestamp asked for), whatever the
time is now.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import msgspec

from projections.memory import PolicyModel
from service.eventlog import EventLog, EventLogUnavailable
from service.events import UnknownEvent, UnknownEventType

#: hex digits of a token hash shown in a replay: enough to tell tokens apart and to find
#: one in the log, while the export is no table of full hashes
TOKEN_HASH_PREFIX = 16

Until = int | datetime

_DB_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


class ReplayError(ValueError):
    """The replay point is malformed or lies beyond the log."""


class ReplayedApplication(msgspec.Struct, frozen=True, kw_only=True):
    client_id: str
    company_id: str
    name: str
    grant_type: str
    redirect_uri: str | None
    ip_allowlist: list[str]
    permissions: list[str]  # sorted
    notification_emails: list[str]
    secret_version: int
    version: int  # the application stream's version


class ReplayedConnection(msgspec.Struct, frozen=True, kw_only=True):
    company_id: str  # the company whose user consented
    client_id: str
    user_id: str  # who consented last
    permissions: list[str]  # sorted


class ReplayedToken(msgspec.Struct, frozen=True, kw_only=True):
    token_hash_prefix: str
    family_id: str
    client_id: str
    company_id: str
    permissions: list[str]  # sorted
    expires_at: datetime | None  # None: never expires


class ReplayedState(msgspec.Struct, frozen=True, kw_only=True):
    position: int  # the last event replayed (0: none)
    at: datetime | None  # the replay moment; None when no event was replayed
    head: int  # the log's head when the replay ran
    applications: list[ReplayedApplication]
    connections: list[ReplayedConnection]
    tokens: list[ReplayedToken]


def parse_until(text: str) -> Until:
    """A log position (digits) or an ISO 8601 timestamp; one without an offset is UTC."""
    text = text.strip()
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ReplayError(
            f"expected a log position or an ISO 8601 timestamp, got {text!r}"
        ) from None
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    try:
        moment.astimezone(UTC)  # 9999-12-31T23:59-05:00 is past what a timestamp holds
    except OverflowError:
        raise ReplayError(f"{text!r} is out of range") from None
    return moment


async def replay(pool: asyncpg.Pool, until: Until, *, batch_size: int = 5000) -> ReplayedState:
    """The state as of `until`, rebuilt from the log alone."""
    eventlog = EventLog(pool)  # reads only: it needs no writer task
    head = await eventlog.head()
    if isinstance(until, datetime):
        position = await _position_at(pool, until, head)
        moment: datetime | None = until
    else:
        if until > head:
            raise ReplayError(f"position {until} is beyond the head of the log ({head})")
        position = until
        moment = await _recorded_at(pool, position)
    model = PolicyModel()
    after = 0
    while after < position:
        batch = await eventlog.read_all(after, batch_size, until=position, lean=True)
        if not batch:
            break
        for recorded in batch:
            if isinstance(recorded.event, UnknownEvent):
                # The model would pass it over, and the state would look whole without it.
                unread = f"{recorded.type} (schema version {recorded.schema_version})"
                raise UnknownEventType(
                    f"{unread} at position {recorded.position} cannot be read by this version"
                )
        model.apply(batch)
        after = batch[-1].position
    return _export(model, position, moment, head)


async def _position_at(pool: asyncpg.Pool, moment: datetime, head: int) -> int:
    """The last position before the first event recorded after `moment`."""
    try:
        first_after = await pool.fetchval(
            "SELECT position FROM events WHERE recorded_at > $1 ORDER BY position LIMIT 1",
            moment,
        )
    except _DB_ERRORS as exc:
        raise EventLogUnavailable(str(exc)) from exc
    return head if first_after is None else int(first_after) - 1


async def _recorded_at(pool: asyncpg.Pool, position: int) -> datetime | None:
    if position == 0:
        return None
    try:
        value = await pool.fetchval("SELECT recorded_at FROM events WHERE position = $1", position)
    except _DB_ERRORS as exc:
        raise EventLogUnavailable(str(exc)) from exc
    if not isinstance(value, datetime):  # a gap: the log was tampered with
        raise ReplayError(
            f"event {position} is missing from the log (tollgate audit verify names the "
            "first broken link)"
        )
    return value


def _export(model: PolicyModel, position: int, moment: datetime | None, head: int) -> ReplayedState:
    applications = [
        ReplayedApplication(
            client_id=app.client_id,
            company_id=app.company_id,
            name=app.name,
            grant_type=app.grant_type,
            redirect_uri=app.redirect_uri,
            ip_allowlist=list(app.ip_allowlist),
            permissions=sorted(app.permissions),
            notification_emails=list(app.notification_emails),
            secret_version=app.secret_version,
            version=app.version,
        )
        for app in sorted(model.apps.values(), key=lambda a: a.client_id)
    ]
    connections = [
        ReplayedConnection(
            company_id=company_id,
            client_id=client_id,
            user_id=connection.user_id,
            permissions=sorted(connection.permissions),
        )
        for (company_id, client_id), connection in sorted(model.connections.items())
    ]
    now = moment.timestamp() if moment is not None else None
    tokens = [
        ReplayedToken(
            token_hash_prefix=token_hash.hex()[:TOKEN_HASH_PREFIX],
            family_id=model.family_of(token_hash, token),
            client_id=token.client_id,
            company_id=token.company_id,
            permissions=sorted(model.effective_permissions(token)),
            expires_at=(
                None if token.expires_at is None else datetime.fromtimestamp(token.expires_at, UTC)
            ),
        )
        for token_hash, token in model.tokens.items()
        if now is not None and (token.expires_at is None or token.expires_at > now)
    ]
    tokens.sort(key=lambda t: (t.client_id, t.family_id, t.token_hash_prefix))
    return ReplayedState(
        position=position,
        at=moment,
        head=head,
        applications=applications,
        connections=connections,
        tokens=tokens,
    )


def encode(state: ReplayedState) -> bytes:
    """The JSON export: indented, keys in a stable order, ending with a newline."""
    return msgspec.json.format(msgspec.json.encode(state), indent=2) + b"\n"
