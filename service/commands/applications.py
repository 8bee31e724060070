"""Applications: command handlers (load the stream, apply the rules, record the events)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from service.context import Context
from service.domain import applications as rules
from service.domain import credentials
from service.errors import NotFound, PreconditionFailed
from service.eventlog import ConcurrencyError, EventLogError, Metadata

MAX_ATTEMPTS = 5


_CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what credentials.new_client_id makes


def stream(client_id: str) -> str:
    return f"application-{client_id}"


@dataclass(frozen=True)
class Created:
    app: rules.Application
    client_secret: str


async def load(ctx: Context, company_id: str, client_id: str) -> rules.Application:
    """The application as its stream tells it; 404 when it is another company's, deleted,
    or unknown (its existence does not leak)."""
    if not _CLIENT_ID.fullmatch(client_id):
        raise NotFound("no such application")  # not even looked up (a NUL, say)
    history = await ctx.eventlog.read_stream(stream(client_id))
    app = rules.fold((r.event, r.version, r.recorded_at.timestamp()) for r in history)
    if app is None or app.deleted or app.company_id != company_id:
        raise NotFound("no such application")
    return app


async def create(
    ctx: Context, company_id: str, command: rules.NewApplication, meta: Metadata
) -> Created:
    client_id = credentials.new_client_id()
    secret = credentials.new_client_secret()
    event = rules.create(
        command,
        company_id=company_id,
        client_id=client_id,
        secret_hash=credentials.digest(secret),
        catalogue=ctx.catalogue,
    )
    await ctx.record(stream(client_id), 0, [event], meta)
    try:
        app = await load(ctx, company_id, client_id)
    except EventLogError:
        # Created, but the log cannot be read back now: answer from the event itself, or
        # the secret (shown only here) would be lost with the answer.
        folded = rules.fold([(event, 1, time.time())])
        assert folded is not None
        app = folded
    return Created(app, secret)


async def update(
    ctx: Context,
    company_id: str,
    client_id: str,
    patch: rules.Patch,
    meta: Metadata,
    *,
    if_match: int | None = None,
) -> rules.Application:
    """Apply `patch` on the latest version. With `if_match` (the version the caller saw)
    a concurrent change is refused (412); without it the patch is re-applied on top of
    the concurrent change, so no update is lost either way."""
    for _ in range(MAX_ATTEMPTS):
        app = await load(ctx, company_id, client_id)
        if if_match is not None and app.version != if_match:
            raise PreconditionFailed(f"the application is at version {app.version}, not {if_match}")
        changes = rules.change(app, patch, ctx.catalogue)
        if not changes:
            return app
        try:
            await ctx.record(stream(client_id), app.version, changes, meta)
        except ConcurrencyError:
            if if_match is not None:
                raise PreconditionFailed("the application changed meanwhile") from None
            continue
        return await load(ctx, company_id, client_id)
    raise PreconditionFailed("the application keeps changing; try again")


async def rotate_secret(
    ctx: Context, company_id: str, client_id: str, meta: Metadata
) -> tuple[rules.Application, str]:
    for _ in range(MAX_ATTEMPTS):
        app = await load(ctx, company_id, client_id)
        secret = credentials.new_client_secret()
        event = rules.rotate_secret(app, credentials.digest(secret))
        try:
            await ctx.record(stream(client_id), app.version, [event], meta)
        except ConcurrencyError:
            continue
        return await load(ctx, company_id, client_id), secret
    raise PreconditionFailed("the application keeps changing; try again")


async def delete(ctx: Context, company_id: str, client_id: str, meta: Metadata) -> None:
    for _ in range(MAX_ATTEMPTS):
        app = await load(ctx, company_id, client_id)
        try:
            await ctx.record(stream(client_id), app.version, [rules.delete(app)], meta)
        except ConcurrencyError:
            continue
        return
    raise PreconditionFailed("the application keeps changing; try again")
