"""Applications: command handlers (load the stream, apply the rules, record the events)."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from service.context import Context
from service.domain import applications as rules
from service.domain import client_keys, credentials
from service.errors import Conflict, NotFound, PreconditionFailed
from service.eventlog import ConcurrencyError, EventLogError, Metadata
from service.events import Event
from service.storage.database import within

# A change made on top of whatever version is current retries when another writer got
# there first. Writers that retry in step collide again, so each waits a random while,
# longer with each attempt; a stream still contended after all of them is a 409 the
# client may retry (never a 412: no precondition was sent).
MAX_ATTEMPTS = 30
BACKOFF = 0.005  # seconds, times the attempt number: the most one wait can be


def still_changing(what: str = "the application") -> Conflict:
    """Changed by others at every attempt, with no precondition sent: a 409 the client may
    retry (never a 412, which says a condition the request sent was false)."""
    return Conflict(f"{what} keeps changing; try again", headers={"Retry-After": "1"})


async def backoff(attempt: int) -> None:
    await asyncio.sleep(random.uniform(0, BACKOFF * (attempt + 1)))  # noqa: S311 -- jitter


def precondition(version: int, if_match: Collection[int] | None) -> None:
    """If-Match (RFC 9110 §13.1.1): PreconditionFailed (412) when the version the change
    would be made on is not one the caller accepts; None: any."""
    if if_match is not None and version not in if_match:
        seen = ", ".join(map(str, sorted(if_match))) or "none given"
        raise PreconditionFailed(f"the application is at version {version}, not {seen}")


def raced(if_match: Collection[int] | None) -> None:
    """A concurrent change committed first: with a precondition, the version it named is
    gone (412); without, the change is decided again on the new one."""
    if if_match is not None:
        raise PreconditionFailed("the application changed meanwhile")


_CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what credentials.new_client_id makes


def stream(client_id: str) -> str:
    return f"application-{client_id}"


@dataclass(frozen=True)
class Created:
    app: rules.Application
    client_secret: str


def limits(ctx: Context) -> rules.AllowlistLimits:
    return rules.AllowlistLimits(
        ctx.settings.allowlist_min_prefix_v4, ctx.settings.allowlist_min_prefix_v6
    )


History = list[tuple[Event, int, float]]


async def load(ctx: Context, company_id: str, client_id: str) -> rules.Application:
    """The application as its stream tells it; 404 when it is another company's, deleted,
    or unknown (its existence does not leak)."""
    app, _ = await _read(ctx, company_id, client_id)
    return app


async def _read(ctx: Context, company_id: str, client_id: str) -> tuple[rules.Application, History]:
    if not _CLIENT_ID.fullmatch(client_id):
        raise NotFound("no such application")  # not even looked up (a NUL, say)
    recorded = await ctx.eventlog.read_stream(stream(client_id))
    history = [(r.event, r.version, r.recorded_at.timestamp()) for r in recorded]
    app = rules.fold(history)
    if app is None or app.deleted or app.company_id != company_id:
        raise NotFound("no such application")
    return app, history


async def _after(
    ctx: Context, company_id: str, client_id: str, history: History, events: list[Event]
) -> rules.Application:
    """The application once `events`, just committed, follow `history`: read back, or, when
    the log cannot be read back within its bound, folded from what was read before and the
    events. A committed change is never answered as failed (a rotated secret is shown only
    in that answer), and the answer comes within the bound even behind a stalled database
    (the change's own wait for this process's models has had its bound already)."""
    try:
        return await within(ctx.eventlog.timeout or 5.0, load(ctx, company_id, client_id))
    except (EventLogError, TimeoutError):
        version, now = history[-1][1] if history else 0, time.time()
        new = [(event, version + i, now) for i, event in enumerate(events, 1)]
        folded = rules.fold([*history, *new])
        assert folded is not None
        return folded


async def create(
    ctx: Context, company_id: str, command: rules.NewApplication, meta: Metadata
) -> Created:
    client_id = credentials.new_client_id()
    secret = credentials.new_client_secret()
    events = rules.create_all(
        command,
        company_id=company_id,
        client_id=client_id,
        secret_hash=credentials.digest(secret),
        catalogue=ctx.catalogue,
        limits=limits(ctx),
    )
    await ctx.record(stream(client_id), 0, events, meta)
    return Created(await _after(ctx, company_id, client_id, [], events), secret)


async def update(
    ctx: Context,
    company_id: str,
    client_id: str,
    patch: rules.Patch,
    meta: Metadata,
    *,
    if_match: Collection[int] | None = None,
) -> rules.Application:
    """Apply `patch` on the latest version. With `if_match` (the versions the caller
    accepts: the one it saw) a concurrent change is refused (412); without it the patch
    is re-applied on top of the concurrent change, so no update is lost either way."""
    for attempt in range(MAX_ATTEMPTS):
        app, history = await _read(ctx, company_id, client_id)
        precondition(app.version, if_match)
        changes = rules.change(app, patch, ctx.catalogue, limits(ctx))
        if not changes:
            return app
        try:
            await ctx.record(stream(client_id), app.version, changes, meta)
        except ConcurrencyError:
            raced(if_match)
            await backoff(attempt)
            continue
        return await _after(ctx, company_id, client_id, history, changes)
    raise still_changing()


async def rotate_secret(
    ctx: Context,
    company_id: str,
    client_id: str,
    meta: Metadata,
    *,
    if_match: Collection[int] | None = None,
) -> tuple[rules.Application, str]:
    for attempt in range(MAX_ATTEMPTS):
        app, history = await _read(ctx, company_id, client_id)
        precondition(app.version, if_match)
        secret = credentials.new_client_secret()
        event = rules.rotate_secret(app, credentials.digest(secret))
        try:
            await ctx.record(stream(client_id), app.version, [event], meta)
        except ConcurrencyError:
            raced(if_match)
            await backoff(attempt)
            continue
        return await _after(ctx, company_id, client_id, history, [event]), secret
    raise still_changing()


async def _changed(
    ctx: Context,
    company_id: str,
    client_id: str,
    meta: Metadata,
    decide: Callable[[rules.Application], list[Event]],
) -> rules.Application:
    """Record what `decide` makes of the latest version, retried on a concurrent change."""
    for attempt in range(MAX_ATTEMPTS):
        app, history = await _read(ctx, company_id, client_id)
        events = decide(app)
        if not events:  # nothing to change (keys registered already): nothing to record
            return app
        try:
            await ctx.record(stream(client_id), app.version, events, meta)
        except ConcurrencyError:
            await backoff(attempt)
            continue
        return await _after(ctx, company_id, client_id, history, events)
    raise still_changing()


async def add_keys(
    ctx: Context, company_id: str, client_id: str, jwks: object, meta: Metadata
) -> rules.Application:
    """Register public keys (a JWK Set) beside those the application has: a new key can
    sign before the old one is removed."""
    keys = client_keys.jwks(jwks)
    return await _changed(
        ctx,
        company_id,
        client_id,
        meta,
        lambda app: client_keys.add(app.company_id, app.client_id, app.keys, keys),
    )


async def remove_key(
    ctx: Context, company_id: str, client_id: str, kid: str, meta: Metadata
) -> rules.Application:
    """An assertion signed with the removed key is refused from the moment this commits:
    a token being issued on it fails its append (the application's version moved)."""
    return await _changed(
        ctx,
        company_id,
        client_id,
        meta,
        lambda app: [client_keys.remove(app.company_id, app.client_id, app.keys, kid)],
    )


async def delete(
    ctx: Context,
    company_id: str,
    client_id: str,
    meta: Metadata,
    *,
    if_match: Collection[int] | None = None,
) -> None:
    for attempt in range(MAX_ATTEMPTS):
        app = await load(ctx, company_id, client_id)
        precondition(app.version, if_match)
        try:
            await ctx.record(stream(client_id), app.version, [rules.delete(app)], meta)
        except ConcurrencyError:
            raced(if_match)
            await backoff(attempt)
            continue
        return
    raise still_changing()
