"""Signing in and out with a company user's email and password (a browser session)."""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from html import escape
from typing import Annotated

import msgspec
import structlog
from aiohttp import web

from projections.directory import User
from service.commands import directory
from service.context import Context
from service.domain import credentials, passwords
from service.domain.applications import FieldError
from service.errors import Forbidden, TollgateError
from service.web import auth, pages, sessions
from service.web.bodies import form_body, json_body
from service.web.keys import CONTEXT, THROTTLE, caller_ip, metadata, secure_cookies

routes = web.RouteTableDef()
log = structlog.get_logger(__name__)


class LoginIn(msgspec.Struct, forbid_unknown_fields=True):
    email: Annotated[str, msgspec.Meta(max_length=320)]
    password: Annotated[str, msgspec.Meta(max_length=256)]
    # Which company's account, when the address has accounts at several that this
    # password opens (the answer without it lists them: 400 company_required).
    company_id: Annotated[str, msgspec.Meta(max_length=100)] | None = None


MAX_LOGGED_EMAIL = 320
WRONG = "Wrong email or password."


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


def sign_in_address(typed: str) -> str:
    """The address as accounts are kept under it (directory.normalise_email: NFC, the domain
    in Unicode), so that the same address typed in another form (decomposed, a punycode
    domain, spaces around it) opens the same account and meets the same throttle; as typed
    when it is no address at all (answered as an unknown one)."""
    try:
        return directory.normalise_email(typed.strip())
    except FieldError:
        return typed.strip()


def _as_logged(address: str) -> str:
    """The address as the log and the throttle's table keep it: it says whose account is
    under attack. Text that is no address at all is often a password typed into the wrong
    field: kept as nothing of it. A digest (as before) was a fast unsalted hash of a
    password, which a reader of the log or the table could try guesses against; such text
    opens no account, so nothing is lost by keeping none of it."""
    if "@" in address and " " not in address and len(address) <= MAX_LOGGED_EMAIL:
        try:
            directory.normalise_email(address)
            return address
        except FieldError:
            pass
    return "not-an-address"


async def matching_accounts(
    request: web.Request, email: str, password: str, company_id: str | None = None
) -> list[User]:
    """The live accounts of the address (one per company) that this password opens, at
    least one; only the one at `company_id` when it is given. The same work and answer for
    an unknown email as for a wrong password. Failures are throttled per address and
    caller, and per address from anywhere (a slower limit against guessing from many
    places)."""
    email = sign_in_address(email)
    throttle = request.app[THROTTLE]
    ip = caller_ip(request)
    who = _as_logged(email)
    keys = ((f"{who.lower()}|{ip}", throttle.limit), (f"{who.lower()}|*", 4 * throttle.limit))
    # Counted as failed before the (slow) check, in one statement shared by every process,
    # so that a burst of concurrent attempts meets the limit as a sequence would; a success
    # takes its count back.
    attempt = await throttle.attempt(keys)
    if attempt.retry_after:
        log.warning(
            "security.sign_in_throttled", email=who, ip=ip, retry_after=round(attempt.retry_after)
        )
        raise TooManyAttempts(attempt.retry_after)
    try:
        matched = await _matching(request, email, password, company_id)
    except InvalidCredentials:
        log.warning("security.sign_in_failed", email=who, ip=ip)
        raise
    await throttle.withdraw(attempt)
    return matched


#: how many of an address's accounts a failed sign-in's time hides: the answer takes at
#: least as long as checking this many hashes one after another, however many the address
#: has (argon2 takes the cores: several hashes checked together take about as many times
#: one's time), so an address known at a few companies fails like an unknown one
HIDDEN_ACCOUNTS = 4


class HashTime:
    """How long checking one password hash takes in this process, now: a moving average of
    the checks of the sign-ins that checked one (an unknown address, or an address with
    one account), each timed on its thread (a wait for a thread is not the hash's), held
    within CEILING times a floor: the fastest check seen, which may rise (to the checks
    that come) by half every minute. A burst of sign-ins that slows every check cannot
    make every failure wait for long after it; a machine that stays slower is followed."""

    CEILING = 3.0
    FLOOR_RISE = 1.5  # a minute

    def __init__(self) -> None:
        self._typical: float | None = None
        self._floor: float | None = None
        self._seen = 0.0
        #: the first sign-ins of a process wait for one calibration, not one each
        self.calibrating = asyncio.Lock()

    def observe(self, seconds: float, now: float) -> None:
        if self._floor is None:
            self._floor = seconds
        else:
            risen = self._floor * self.FLOOR_RISE ** ((now - self._seen) / 60)
            self._floor = min(seconds, risen)
        self._seen = now
        self._typical = seconds if self._typical is None else 0.8 * self._typical + 0.2 * seconds

    @property
    def seconds(self) -> float | None:
        if self._typical is None or self._floor is None:
            return None
        return min(self._typical, self.CEILING * self._floor)


def _timed_check(password: str, stored: str) -> tuple[bool, float]:
    """A hash check on a worker thread, and how long it took there."""
    started = time.perf_counter()
    ok = passwords.verify_password(password, stored)
    return ok, time.perf_counter() - started


HASH_TIME = HashTime()


async def _matching(
    request: web.Request, email: str, password: str, company_id: str | None
) -> list[User]:
    ctx = request.app[CONTEXT]
    # Caught up first: a password changed or a user removed through another process a
    # moment ago must not let the old password open a new session here.
    await ctx.lookups.catch_up()
    # Copies, as they are when their hashes are checked: the model changes its users in
    # place, and a session is tagged with the version of the password that opened it.
    accounts = [msgspec.structs.replace(u) for u in await ctx.lookups.accounts(email)]
    # Every account's hash is checked, at once (argon2 runs outside the GIL), whatever
    # `company_id` names; an unknown address checks one that nobody's password opens.
    hashes = [u.password_hash for u in accounts] or [passwords.DUMMY_HASH]
    loop = asyncio.get_running_loop()
    if HASH_TIME.seconds is None:  # this process's first sign-ins: what one check costs
        async with HASH_TIME.calibrating:
            if HASH_TIME.seconds is None:
                _, took = await asyncio.to_thread(_timed_check, "", passwords.DUMMY_HASH)
                HASH_TIME.observe(took, loop.time())
    started = loop.time()
    checked = await asyncio.gather(*(asyncio.to_thread(_timed_check, password, h) for h in hashes))
    if len(hashes) == 1:
        HASH_TIME.observe(checked[0][1], loop.time())
    verdicts = [ok for ok, _ in checked]
    matched = [u for u, ok in zip(accounts, verdicts, strict=False) if ok and not u.removed]
    if company_id is not None:
        matched = [u for u in matched if u.company_id == company_id]
    if not matched:
        # The hashes took longer the more accounts the address has: a failure is answered
        # once HIDDEN_ACCOUNTS' time has passed, whichever it was (a success needs the
        # password, and says nothing more to whoever has it).
        if HASH_TIME.seconds is not None:
            await asyncio.sleep(started + HIDDEN_ACCOUNTS * HASH_TIME.seconds - loop.time())
        raise InvalidCredentials(WRONG)
    return matched


async def authenticate(
    request: web.Request, email: str, password: str, *, next_url: str | None = None
) -> User:
    """The account these credentials open, as its password was checked, for a sign-in
    form. When the password opens the address's accounts at several companies, the person
    chooses one: raises a redirect (303) to the choice page, which then goes on to
    `next_url` (a path on this service; by default where the form's own flow goes)."""
    matched = await matching_accounts(request, email, password)
    if len(matched) == 1:
        return matched[0]
    destination = next_url if next_url is not None else _AFTER.get(request.path, "/")
    raise await _to_choice(request, matched, destination)


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
    matched = await matching_accounts(request, body.email, body.password, body.company_id)
    if len(matched) > 1:
        # Only the owner of the password gets here: the companies are theirs to see.
        companies = [_company(ctx, u) for u in matched]
        return web.json_response(
            {
                "error": "company_required",
                "error_description": "this address has accounts at several companies: "
                "send the same request again with company_id, one of companies",
                "companies": [{"company_id": c, "name": n} for c, n in companies],
            },
            status=400,
            headers={"Cache-Control": "no-store"},
        )
    [user] = matched
    value, csrf = await sessions.create(
        ctx.pool, user.user_id, user.company_id, user_version=user.version,
        replacing=request.cookies.get(sessions.COOKIE),
    )  # fmt: skip
    response = web.json_response(
        {"user_id": user.user_id, "company_id": user.company_id, "role": user.role,
         "csrf_token": csrf},
        headers={"Cache-Control": "no-store"},
    )  # fmt: skip
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
    value, csrf = await change_own_password(
        request, user_id, who.company_id, body.current_password, body.new_password
    )
    response = web.json_response({"user_id": user_id, "csrf_token": csrf},
                                 headers={"Cache-Control": "no-store"})  # fmt: skip
    set_session_cookie(request, response, value)
    return response


async def change_own_password(
    request: web.Request, user_id: str, company_id: str, current: str, new: str
) -> tuple[str, str]:
    """The signed-in user's password changed, proven by the current one (the API's and
    the dashboard's form alike): throttled per user like sign-ins, every session of the
    user ended, and a new one for the caller: its cookie value and CSRF token."""
    ctx = request.app[CONTEXT]
    throttle = request.app[THROTTLE]
    attempt = await throttle.attempt(((f"password|{user_id}", throttle.limit),))
    if attempt.retry_after:
        raise TooManyAttempts(attempt.retry_after)
    meta = metadata(request, f"user:{user_id}")
    try:
        await directory.change_own_password(ctx, user_id, current, new, meta)
    except directory.WrongPassword:
        log.warning("security.password_change_refused", user_id=user_id, ip=caller_ip(request))
        raise
    except TollgateError:
        await throttle.withdraw(attempt)  # a weak new password, say: no guess at the current one
        raise
    await throttle.withdraw(attempt)
    changed = ctx.directory.users[user_id]  # the new password's version: caught up
    return await sessions.create(
        ctx.pool, user_id, company_id, user_version=changed.version,
        replacing=request.cookies.get(sessions.COOKIE),
    )  # fmt: skip


@routes.delete("/session")
async def logout(request: web.Request) -> web.Response:
    value = request.cookies.get(sessions.COOKIE)
    if value:
        await sessions.delete(request.app[CONTEXT].pool, value)
    response = web.Response(status=204)
    response.del_cookie(sessions.COOKIE, path="/")
    return response


# --- choosing a company, when one password opens the address's accounts at several -----

CHOICE_COOKIE = "tg_sign_in_choice"
CHOICE_PATH = "/sign-in/choose"
#: Where a sign-in form's flow goes after the choice when its caller names nothing.
_AFTER = {"/dashboard/login": "/dashboard"}
#: What sessions.create_choice hands out: 32 random bytes in base64url without padding.
_CHOICE_KEY = re.compile(r"[A-Za-z0-9_-]{43}")


def _company(ctx: Context, user: User) -> tuple[str, str]:
    """The account's company: (id, name)."""
    company = ctx.directory.companies.get(user.company_id)
    return user.company_id, company.name if company is not None else user.company_id


def _local(url: str) -> str:
    """A path on this service: never an open redirect."""
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/"


async def _to_choice(request: web.Request, matched: list[User], next_url: str) -> web.HTTPSeeOther:
    """The sign-in waits server side (the accounts the password matched, where to go
    next) under a random key that only this browser holds, in a cookie for the choice
    page alone: the password is neither kept nor put in the page."""
    ctx = request.app[CONTEXT]
    accounts = [(u.user_id, u.version) for u in matched]
    key = await sessions.create_choice(ctx.pool, accounts, _local(next_url))
    response = web.HTTPSeeOther(CHOICE_PATH, headers={"Cache-Control": "no-store"})
    response.set_cookie(
        CHOICE_COOKIE, key, max_age=int(sessions.CHOICE_LIFETIME.total_seconds()),
        httponly=True, samesite="Strict", secure=secure_cookies(request), path=CHOICE_PATH,
    )  # fmt: skip
    return response


def _choice_key(request: web.Request) -> str | None:
    """The choice cookie, only if it has the shape this service issues."""
    value = request.cookies.get(CHOICE_COOKIE, "")
    return value if _CHOICE_KEY.fullmatch(value) else None


def choice_token(key: str) -> str:
    """The choice form's CSRF token, derived from the choice's cookie, which another site
    can neither read nor send along (SameSite=Strict)."""
    return credentials.digest("sign-in-choice:" + key)


async def _still_open(ctx: Context, choice: sessions.Choice) -> list[User]:
    """The accounts of the choice that are still as the password found them: a user
    removed, or a password changed, since then drops out."""
    await ctx.lookups.catch_up()
    found = (ctx.directory.users.get(user_id) for user_id, _ in choice.accounts)
    versions = dict(choice.accounts)
    return [
        u for u in found if u is not None and not u.removed and versions[u.user_id] == u.version
    ]


def _expired() -> web.Response:
    response = pages.error_page(
        "Sign in again",
        "Choosing a company took too long, or the choice was made already. Sign in again.",
    )
    response.del_cookie(CHOICE_COOKIE, path=CHOICE_PATH)
    return response


def _redirect_uri(ctx: Context, next_url: str) -> str | None:
    """Where the flow after the choice may end: an authorization request's registered
    redirect URI (its CSP form-action must let the browser follow), as on the sign-in
    form that led here."""
    from service.web.authorize import _registered_redirect  # it imports this module

    return _registered_redirect(ctx, next_url)


@routes.get(CHOICE_PATH)
async def choice_page(request: web.Request) -> web.Response:
    """One button per company whose account the password opened; no password field."""
    ctx = request.app[CONTEXT]
    key = _choice_key(request)
    choice = await sessions.peek_choice(ctx.pool, key) if key is not None else None
    accounts = await _still_open(ctx, choice) if choice is not None else []
    if key is None or choice is None or not accounts:
        return _expired()
    companies = [_company(ctx, u) for u in accounts]
    names = [name for _, name in companies]
    buttons = "\n".join(
        f'<button class="primary" type="submit" name="company_id" value="{escape(cid)}">'
        f"{escape(name if names.count(name) == 1 else f'{name} ({cid})')}</button>"
        for cid, name in companies
    )
    body = (
        "<h1>Choose a company</h1>\n"
        f'<p class="muted">{escape(accounts[0].email)}</p>\n'
        "<p>This address has accounts at several companies. Choose one:</p>\n"
        f'<form method="post" action="{CHOICE_PATH}">\n'
        f'<input type="hidden" name="csrf_token" value="{choice_token(key)}">\n'
        f'<div class="actions">\n{buttons}\n</div>\n</form>'
    )
    return pages.page("Choose a company", body, redirect_uri=_redirect_uri(ctx, choice.next_url))


@routes.post(CHOICE_PATH)
async def choose(request: web.Request) -> web.StreamResponse:
    """The company chosen: a session for its account, then on where the sign-in was going.
    The choice is used up whatever the answer."""
    ctx = request.app[CONTEXT]
    form = await form_body(request)
    key = _choice_key(request)
    # surrogatepass: a field holding lone surrogates must compare unequal, not raise.
    presented = str(form.get("csrf_token", "")).encode("utf-8", "surrogatepass")
    if key is None or not hmac.compare_digest(presented, choice_token(key).encode()):
        return pages.error_page("Request refused", "The form expired. Sign in again.", status=403)
    choice = await sessions.take_choice(ctx.pool, key)
    if choice is None:
        return _expired()
    company_id = str(form.get("company_id", ""))
    chosen = [u for u in await _still_open(ctx, choice) if u.company_id == company_id]
    if not chosen:
        return _expired()
    user = chosen[0]  # one account per company and address
    value, _csrf = await sessions.create(
        ctx.pool, user.user_id, user.company_id, user_version=dict(choice.accounts)[user.user_id],
        replacing=request.cookies.get(sessions.COOKIE),
    )  # fmt: skip
    log.info("sign_in.company_chosen", user_id=user.user_id, company_id=user.company_id)
    response = web.HTTPSeeOther(choice.next_url, headers={"Cache-Control": "no-store"})
    set_session_cookie(request, response, value)
    response.del_cookie(CHOICE_COOKIE, path=CHOICE_PATH)
    raise response
