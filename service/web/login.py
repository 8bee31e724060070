"""Signing in and out with a company user's email and password (a browser session)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgspec
import structlog
from aiohttp import web

from service.commands import directory
from service.domain import passwords
from service.errors import Forbidden, TollgateError
from service.web import auth, sessions
from service.web.bodies import json_body
from service.web.keys import CONTEXT, THROTTLE, caller_ip, metadata, secure_cookies

routes = web.RouteTableDef()
log = structlog.get_logger(__name__)


class LoginIn(msgspec.Struct, forbid_unknown_fields=True):
    email: Annotated[str, msgspec.Meta(max_length=320)]
    password: Annotated[str, msgspec.Meta(max_length=256)]


MAX_LOGGED_EMAIL = 320


class InvalidCredentials(TollgateError):
    error = "invalid_credentials"
    status = 401


class TooManyAttempts(InvalidCredentials):
    error = "too_many_attempts"
    status = 429

    def __init__(self, seconds: float) -> None:
        wait = max(1, int(seconds) + 1)
        super().__init__(
            f"too many failed sign-ins; try again in {wait} seconds",
            headers={"Retry-After": str(wait)},
        )


async def authenticate(request: web.Request, email: str, password: str) -> str:
    """The user id for these credentials; the same work and answer for an unknown email
    as for a wrong password. Failures are throttled per address and caller, and per
    address from anywhere (a slower limit against guessing from many places)."""
    throttle = request.app[THROTTLE]
    ip = caller_ip(request)
    keys = ((f"{email.lower()}|{ip}", throttle.limit), (f"{email.lower()}|*", 4 * throttle.limit))
    # Counted as failed before the (slow) check, in one statement shared by every process,
    # so that a burst of concurrent attempts meets the limit as a sequence would; a success
    # takes its count back.
    attempt = await throttle.attempt(keys)
    # The email says whose account is under attack; the password is never logged.
    who = email[:MAX_LOGGED_EMAIL]
    if attempt.retry_after:
        log.warning(
            "security.sign_in_throttled", email=who, ip=ip, retry_after=round(attempt.retry_after)
        )
        raise TooManyAttempts(attempt.retry_after)
    try:
        user_id = await _check_password(request, email, password)
    except InvalidCredentials:
        log.warning("security.sign_in_failed", email=who, ip=ip)
        raise
    await throttle.withdraw(attempt)
    return user_id


async def _check_password(request: web.Request, email: str, password: str) -> str:
    ctx = request.app[CONTEXT]
    # Caught up first: a password changed or a user removed through another process a
    # moment ago must not let the old password open a new session here.
    await ctx.lookups.catch_up()
    user = await ctx.lookups.user_by_email(email)
    stored = passwords.DUMMY_HASH if user is None or user.removed else user.password_hash
    ok = await asyncio.to_thread(passwords.verify_password, password, stored)
    if not ok or user is None or user.removed:
        raise InvalidCredentials("Wrong email or password.")
    return user.user_id


def set_session_cookie(request: web.Request, response: web.StreamResponse, value: str) -> None:
    response.set_cookie(
        sessions.COOKIE,
        value,
        max_age=int(sessions.LIFETIME.total_seconds()),
        httponly=True,
        samesite="Lax",
        secure=secure_cookies(request),
        path="/",
    )


@routes.post("/session")
async def login(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = await json_body(request, LoginIn)
    user_id = await authenticate(request, body.email, body.password)
    user = ctx.directory.users[user_id]
    value, csrf = await sessions.create(ctx.pool, user_id, user.company_id)
    response = web.json_response(
        {"user_id": user_id, "company_id": user.company_id, "role": user.role, "csrf_token": csrf},
        headers={"Cache-Control": "no-store"},
    )
    set_session_cookie(request, response, value)
    return response


class PasswordChangeIn(msgspec.Struct, forbid_unknown_fields=True):
    current_password: Annotated[str, msgspec.Meta(max_length=256)]
    new_password: Annotated[str, msgspec.Meta(max_length=256)]


@routes.post("/session/password")
async def change_password(request: web.Request) -> web.Response:
    """The signed-in user's own password, proven by the current one. Every session of the
    user ends (in every process); the caller gets a new one in the answer."""
    ctx = request.app[CONTEXT]
    who = await auth.principal(request, ctx)
    if who.session is None:
        raise Forbidden("sign in with your email and password to change your password")
    body = await json_body(request, PasswordChangeIn)
    user_id = who.actor.removeprefix("user:")
    throttle = request.app[THROTTLE]
    attempt = await throttle.attempt(((f"password|{user_id}", throttle.limit),))
    if attempt.retry_after:
        raise TooManyAttempts(attempt.retry_after)
    meta = metadata(request, who.actor)
    try:
        await directory.change_own_password(
            ctx, user_id, body.current_password, body.new_password, meta
        )
    except directory.WrongPassword:
        log.warning("security.password_change_refused", user_id=user_id, ip=caller_ip(request))
        raise
    except TollgateError:
        await throttle.withdraw(attempt)  # a weak new password, say: no guess at the current one
        raise
    await throttle.withdraw(attempt)
    value, csrf = await sessions.create(ctx.pool, user_id, who.company_id)
    response = web.json_response({"user_id": user_id, "csrf_token": csrf},
                                 headers={"Cache-Control": "no-store"})  # fmt: skip
    set_session_cookie(request, response, value)
    return response


@routes.delete("/session")
async def logout(request: web.Request) -> web.Response:
    value = request.cookies.get(sessions.COOKIE)
    if value:
        await sessions.delete(request.app[CONTEXT].pool, value)
    response = web.Response(status=204)
    response.del_cookie(sessions.COOKIE, path="/")
    return response
