"""Who is calling the admin API: an admin key (Bearer) or a logged-in user's session."""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

from projections.directory import User
from service.context import Context
from service.domain import credentials
from service.errors import Forbidden, InvalidRequest, Unauthorized
from service.oauth import credentials as authorization
from service.web import sessions
from service.web.keys import authorization_header

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_ADMIN_KEY = re.compile(rf"^{credentials.ADMIN_KEY_PREFIX}[A-Za-z0-9_-]{{43}}\Z")


@dataclass(frozen=True)
class Principal:
    company_id: str
    actor: str  # "admin_key:<id>" or "user:<id>", recorded with every change
    role: str
    session: sessions.Session | None = None


def bearer(request: web.Request) -> str | None:
    found = authorization.parse(authorization_header(request, InvalidRequest))
    if found is None:
        return None
    if not isinstance(found, authorization.Bearer):
        raise Unauthorized("use Authorization: Bearer <admin key>", realm="tollgate-admin")
    return found.value


async def principal(request: web.Request, ctx: Context) -> Principal:
    key = bearer(request)
    if key is not None:
        return await _admin_key(ctx, key)
    found = await signed_in(request, ctx)
    if found is not None:
        session, user = found
        if request.method not in SAFE_METHODS and not session.csrf_ok(
            request.headers.get("X-CSRF-Token", "")
        ):
            raise Forbidden("a session-authenticated change needs its X-CSRF-Token header")
        return Principal(user.company_id, f"user:{user.user_id}", user.role, session)
    raise Unauthorized(realm="tollgate-admin")


async def signed_in(request: web.Request, ctx: Context) -> tuple[sessions.Session, User] | None:
    """The browser session and its user, while both are live: a removed user's session is
    worth nothing, nor one opened with a password changed since (by its owner or reset by
    an admin, whichever process opened it)."""
    value = request.cookies.get(sessions.COOKIE)
    session = await sessions.load(ctx.pool, value) if value else None
    user = ctx.directory.users.get(session.user_id) if session is not None else None
    if session is None or user is None or user.removed:
        return None
    if session.user_version is not None and session.user_version < user.version:
        return None
    return session, user


async def _admin_key(ctx: Context, key: str) -> Principal:
    if not _ADMIN_KEY.match(key):
        raise Unauthorized("malformed admin key", realm="tollgate-admin")
    found = await ctx.lookups.admin_key(credentials.digest(key))
    if found is None or not found.live:
        raise Unauthorized("unknown or revoked admin key", realm="tollgate-admin")
    return Principal(found.company_id, f"admin_key:{found.key_id}", "admin")


async def admin(request: web.Request, ctx: Context) -> Principal:
    """A company admin; members are refused (they may only grant consent)."""
    who = await principal(request, ctx)
    if who.role != "admin":
        raise Forbidden("only company admins may manage applications, users and keys")
    return who
