"""Snapshots of the in-memory models, so that a process starts from the newest one and
applies only the log after it, instead of the whole log from its first event.

A start that applies the whole log takes longer the longer the log (5.3-7.2 s for about a
million token events on the bench machine), and a service that issues thousands of tokens
a second adds hundreds of millions of events a day. So the projections process (or the
single `serve` process, which runs the projections) writes the models now and then into
`model_snapshots`: it starts two models of its own from the newest snapshot, applies the
log after it, drops what has expired, and writes them, in parts, under an advisory lock so
that one process at a time does it. Its models are its own, not the ones that serve
requests (inside a single `serve` it shares the event loop with them, a step at a time: a
batch of events applied, or a part encoded).

A start takes the newest complete snapshot of its own format (a digest of the code that
builds the models: another version of Tollgate builds them differently, and starts from
the log) whose event is still in the log with the hash it had (a database restored from a
backup, or a log that is not this one, is started from the log). Anything wrong with a
snapshot is logged, and the process starts from the log as it always could.

What a snapshot holds is what the models hold: hashes of tokens, secrets and passwords,
never one in clear.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import time
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import asyncpg
import msgspec
import structlog

from projections.directory import AdminKey, Company, DirectoryModel, ResourceServer, User
from projections.memory import PolicyModel
from service.domain.state import (
    AppState,
    CodeState,
    ConnectionState,
    FamilyState,
    TokenState,
    networks_of,
)
from service.eventlog import EventLog
from service.logs import error_text
from service.storage.database import Database, lock_session

log = structlog.get_logger(__name__)


def _sources() -> list[Path]:
    """The source of every module whose change could change what the models hold after
    the same events, this one's included."""
    import projections.directory
    import projections.memory
    import service.domain.client_keys
    import service.domain.state
    import service.domain.streams
    import service.eventlog.records
    import service.events

    modules = (
        projections.directory, projections.memory, service.domain.client_keys,
        service.domain.state, service.domain.streams, service.events,
        service.eventlog.records,
    )  # fmt: skip
    return [Path(__file__), *(Path(m.__file__ or "") for m in modules)]


def format_of(sources: list[Path]) -> str:
    """A digest of the code that builds the models: a snapshot of another version of
    Tollgate is not used."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


FORMAT = format_of(_sources())
#: tokens and families in each part after the first (a part is encoded, written and read
#: on its own: none holds the event loop for long, none nears PostgreSQL's 1 GB a value)
PART_ITEMS = 50_000
LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"tollgate.model_snapshot").digest()[:8], "big", signed=True
)

# AppState keeps its allow list parsed (ipaddress networks, which msgspec does not encode):
# the snapshot keeps every other field, and the networks are parsed again when it is read.
_APP_FIELDS = tuple(f for f in AppState.__struct_fields__ if f != "networks")
_app_hints = typing.get_type_hints(AppState)
_App = msgspec.defstruct("_App", [(f, _app_hints[f]) for f in _APP_FIELDS], array_like=True)


class _Policy(msgspec.Struct, array_like=True):
    apps: list[_App]  # type: ignore[valid-type]
    refresh_tokens: dict[str, str]
    connections: list[tuple[str, str, ConnectionState]]
    codes: dict[str, CodeState]
    client_families: dict[str, list[str]]
    client_tokens: dict[str, list[bytes]]
    expiry: list[tuple[int, bytes]]


class _Directory(msgspec.Struct, array_like=True):
    companies: list[Company]
    users: list[User]
    accounts_by_email: dict[str, list[str]]
    admin_keys: list[AdminKey]
    admin_key_hashes: dict[str, str]  # key hash → key id
    resource_servers: list[ResourceServer]
    resource_server_hashes: dict[str, str]  # key hash → server id


class _Head(msgspec.Struct, array_like=True):
    position: int
    policy: _Policy
    directory: _Directory


class _Part(msgspec.Struct, array_like=True):
    tokens: list[tuple[bytes, TokenState]]
    families: list[tuple[str, FamilyState]]


_HeadDecoder = msgspec.msgpack.Decoder(_Head)
_PartDecoder = msgspec.msgpack.Decoder(_Part)
_encode = msgspec.msgpack.Encoder().encode


# --- the models as parts ----------------------------------------------------------------


def encode(policy: PolicyModel, directory: DirectoryModel) -> Iterator[bytes]:
    """The two models as parts: the first holds all but the tokens and families, each
    next one up to PART_ITEMS of each. Both models must be at the same position."""
    if policy.position != directory.position:
        raise ValueError(f"models at {policy.position} and {directory.position}")
    apps = [_App(*(getattr(app, f) for f in _APP_FIELDS)) for app in policy.apps.values()]
    head = _Head(
        policy.position,
        _Policy(
            apps,
            policy.refresh_tokens,
            [(company, client, c) for (company, client), c in policy.connections.items()],
            policy.codes,
            {client: sorted(f) for client, f in policy._client_families.items()},
            policy._client_tokens,
            policy._expiry,
        ),
        _Directory(
            list(directory.companies.values()),
            list(directory.users.values()),
            directory.accounts_by_email,
            list(directory.admin_keys.values()),
            directory.admin_key_hashes,
            list(directory.resource_servers.values()),
            {h: s.resource_server_id for h, s in directory.resource_server_hashes.items()},
        ),
    )
    yield _encode(head)
    # Sliced as they go (the writer's models do not change meanwhile): no list of a
    # million items built at once, which held the loop for 0.1 s.
    tokens, families = iter(policy.tokens.items()), iter(policy.families.items())
    while True:
        part = _Part(list(islice(tokens, PART_ITEMS)), list(islice(families, PART_ITEMS)))
        if not part.tokens and not part.families:
            return
        yield _encode(part)


def part_count(policy: PolicyModel) -> int:
    """How many parts `encode` yields for these models: the first, then one per
    PART_ITEMS tokens or families, whichever are more."""
    return 1 + -(-max(len(policy.tokens), len(policy.families)) // PART_ITEMS)


def decode(parts: Iterable[bytes]) -> tuple[PolicyModel, DirectoryModel]:
    """New models holding what `encode` wrote. Raises msgspec.DecodeError (or ValueError)
    on parts that are not a snapshot."""
    pieces = iter(parts)
    restoring = _Restoring(next(pieces))
    for piece in pieces:
        restoring.add(piece)
    return restoring.policy, restoring.directory


class _Restoring:
    """Models filled part by part: the first part, then each next as it arrives."""

    def __init__(self, first: bytes) -> None:
        head = _HeadDecoder.decode(first)
        self.policy, self.directory = PolicyModel(), DirectoryModel()
        self.policy.position = self.directory.position = head.position
        # one copy of each client and company id, as applying the log keeps
        self._strings: dict[str, str] = {}
        self._restore_policy(head.policy)
        self._restore_directory(head.directory)

    def _restore_policy(self, state: _Policy) -> None:
        policy, share = self.policy, self._strings.setdefault
        for app in state.apps:
            fields = {f: getattr(app, f) for f in _APP_FIELDS}
            networks = networks_of(fields["ip_allowlist"])
            policy.apps[fields["client_id"]] = AppState(**fields, networks=networks)
        policy.refresh_tokens = state.refresh_tokens
        for company, client, connection in state.connections:
            connection.permissions = policy._intern(connection.permissions)
            policy.connections[(company, client)] = connection
        policy.codes = state.codes
        policy._client_families = {client: set(f) for client, f in state.client_families.items()}
        policy._client_tokens = {
            share(client, client): keys for client, keys in state.client_tokens.items()
        }
        policy._expiry = state.expiry
        heapq.heapify(policy._expiry)  # a heap already; cheap to make sure

    def add(self, piece: bytes) -> None:
        policy, share = self.policy, self._strings.setdefault
        part = _PartDecoder.decode(piece)
        for key, token in part.tokens:
            token.client_id = share(token.client_id, token.client_id)
            token.company_id = share(token.company_id, token.company_id)
            token.permissions = policy._intern(token.permissions)
            policy.tokens[key] = token
        for family_id, family in part.families:
            family.client_id = share(family.client_id, family.client_id)
            family.company_id = share(family.company_id, family.company_id)
            family.permissions = policy._intern(family.permissions)
            policy.families[family_id] = family

    def _restore_directory(self, people: _Directory) -> None:
        directory = self.directory
        directory.companies = {c.company_id: c for c in people.companies}
        directory.users = {u.user_id: u for u in people.users}
        directory.accounts_by_email = people.accounts_by_email
        directory.admin_keys = {k.key_id: k for k in people.admin_keys}
        directory.admin_key_hashes = people.admin_key_hashes
        # The same server object under its id and under each live key's hash: a revocation
        # marks it once, and both see it.
        directory.resource_servers = {s.resource_server_id: s for s in people.resource_servers}
        directory.resource_server_hashes = {
            h: directory.resource_servers[server_id]
            for h, server_id in people.resource_server_hashes.items()
        }


# --- in the database --------------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    policy: PolicyModel
    directory: DirectoryModel
    position: int


_NEWEST = """
SELECT s.position, s.event_hash, s.parts
FROM model_snapshots s
WHERE s.format = $1 AND s.part = 0
ORDER BY s.position DESC LIMIT 1
"""
_PART = "SELECT data FROM model_snapshots WHERE format = $1 AND position = $2 AND part = $3"
_HASH_AT = "SELECT hash FROM events WHERE position = $1"


async def load(pool: asyncpg.Pool) -> Restored | None:
    """Models from the newest usable snapshot (None: there is none, or it cannot be used,
    and the caller starts from the log)."""
    started = time.perf_counter()
    try:
        # Part by part (each a statement of its own, within the pool's bound, and one part
        # held at a time), in one snapshot of the database: a newer snapshot's writer
        # deletes this one's parts as it commits.
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            newest = await conn.fetchrow(_NEWEST, FORMAT)
            if newest is None:
                return None
            position, parts = newest["position"], newest["parts"]
            if await conn.fetchval(_HASH_AT, position) != newest["event_hash"]:
                log.warning("model_snapshot.not_this_log", position=position)
                return None
            restoring = None
            for part in range(parts):
                data = await conn.fetchval(_PART, FORMAT, position, part)
                if data is None:
                    log.warning("model_snapshot.incomplete", position=position, missing=part)
                    return None
                if restoring is None:
                    restoring = _Restoring(data)
                else:
                    restoring.add(data)
        if restoring is None:
            log.warning("model_snapshot.incomplete", position=position, missing=0)
            return None
        policy, directory = restoring.policy, restoring.directory
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        log.warning("model_snapshot.unreadable", error=error_text(exc))
        return None
    except (msgspec.DecodeError, ValueError, TypeError, KeyError) as exc:
        log.warning("model_snapshot.undecodable", error=error_text(exc))
        return None
    seconds = time.perf_counter() - started
    log.info("model_snapshot.restored", position=position, parts=parts,
             tokens=len(policy.tokens), seconds=round(seconds, 3))  # fmt: skip
    return Restored(policy, directory, position)


_BEHIND = """
SELECT (SELECT coalesce(max(position), 0) FROM events) - coalesce(newest.position, 0),
       extract(epoch FROM now() - newest.taken_at)::float8
FROM (SELECT NULL) AS always
LEFT JOIN (SELECT position, taken_at FROM model_snapshots WHERE format = $1 AND part = 0
           ORDER BY position DESC LIMIT 1) AS newest ON true
"""


async def behind(pool: asyncpg.Pool) -> tuple[int, float | None]:
    """What a start would apply after the newest snapshot of this version (the whole log
    when there is none), and that snapshot's age in seconds on the database's clock."""
    row = await pool.fetchrow(_BEHIND, FORMAT)
    assert row is not None  # one row, always
    return int(row[0]), row[1]


async def models(pool: asyncpg.Pool) -> tuple[PolicyModel, DirectoryModel]:
    """The models a process starts with: from the newest usable snapshot, else empty."""
    restored = await load(pool)
    if restored is None:
        return PolicyModel(), DirectoryModel()
    return restored.policy, restored.directory


_WRITE = """
INSERT INTO model_snapshots (format, position, part, parts, event_hash, data)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (format, position, part) DO NOTHING
"""
#: once a snapshot is whole, the older ones of its format go, and those of other formats
#: (other versions of Tollgate, during a rolling deploy) once a day old
_PRUNE = """
DELETE FROM model_snapshots
WHERE (format = $1 AND position < $2)
   OR (format <> $1 AND taken_at < now() - interval '1 day')
"""


def writer(eventlog: EventLog, database: Database, every: int) -> SnapshotWriter | None:
    """What the projections run beside them: a writer every `every` seconds (None: 0)."""
    if every <= 0:
        return None
    return SnapshotWriter(eventlog, database.pool, database.dsn, every=float(every))


class SnapshotWriter:
    """Writes a snapshot every `every` seconds, when the log has grown by `min_events`
    since the newest one."""

    def __init__(
        self, eventlog: EventLog, pool: asyncpg.Pool, dsn: str, *, every: float,
        min_events: int = 10_000, batch_size: int = 5000,
    ) -> None:  # fmt: skip
        self.eventlog = eventlog
        self.pool = pool
        self.dsn = dsn
        self.every = every
        self.min_events = min_events
        self.batch_size = batch_size

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.write_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next round tries again; serving goes on
                log.warning("model_snapshot.failed", error=error_text(exc))

    async def write_once(self) -> int | None:
        """One snapshot, if this process holds the lock and the log has grown enough; its
        position, else None."""
        async with lock_session(self.dsn, LOCK_KEY) as watch:
            if watch is None:
                return None  # another process writes them
            return await self._write()

    async def _write(self) -> int | None:
        started = time.perf_counter()
        grown, _age = await behind(self.pool)  # what a start would apply: what /metrics says
        if grown < self.min_events:
            return None
        head = await self.eventlog.head()
        restored = await load(self.pool)
        if restored is not None:
            policy, directory, since = restored.policy, restored.directory, restored.position
        else:
            policy, directory, since = PolicyModel(), DirectoryModel(), 0
        await self._catch_up(policy, directory, head)
        if policy.position <= since:
            return None
        now = time.time()
        policy.sweep(now)
        policy.compact(now)
        event_hash = await self.pool.fetchval(_HASH_AT, policy.position)
        parts = part_count(policy)
        written = 0
        async with self.pool.acquire() as conn, conn.transaction():
            # Each part is encoded and sent on its own: one part in memory at a time, and
            # the loop runs others between them.
            for n, data in enumerate(encode(policy, directory)):
                await conn.execute(_WRITE, FORMAT, policy.position, n, parts, event_hash, data)
                written += len(data)
            await conn.execute(_PRUNE, FORMAT, policy.position)
        log.info("model_snapshot.written", position=policy.position, parts=parts,
                 bytes=written, tokens=len(policy.tokens),
                 seconds=round(time.perf_counter() - started, 3))  # fmt: skip
        return policy.position

    async def _catch_up(self, policy: PolicyModel, directory: DirectoryModel, until: int) -> None:
        while policy.position < until:
            batch = await self.eventlog.read_all(
                policy.position, self.batch_size, until=until, lean=True
            )
            if not batch:
                break
            policy.apply(batch)
            directory.apply(batch)
