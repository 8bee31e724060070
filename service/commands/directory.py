"""Companies, users, admin keys and resource servers: command handlers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

from service import events as ev
from service.commands.applications import backoff, still_changing
from service.context import Context
from service.domain import credentials, passwords, streams
from service.domain import users as user_rules
from service.domain.applications import FieldError
from service.domain.grants import Record
from service.errors import Conflict, Forbidden, InvalidRequest, NotFound
from service.eventlog import ConcurrencyError, Metadata

ROLES = user_rules.ROLES
MAX_ATTEMPTS = 5


def normalise_email(value: str, field: str = "email") -> str:
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise FieldError(field, f"{value!r}: {exc}") from None


@dataclass(frozen=True)
class NewCompany:
    company_id: str
    admin_user_id: str
    admin_email: str
    admin_password: str
    admin_key_id: str
    admin_key: str


async def create_company(ctx: Context, name: str, admin_email: str, meta: Metadata) -> NewCompany:
    name = name.strip()
    if not 1 <= len(name) <= 200:
        raise FieldError("name", "must be 1 to 200 characters")
    # An address may have accounts at other companies: a new company has none of it.
    email = normalise_email(admin_email, "admin_email")
    company_id = credentials.new_id("co")
    await ctx.record(
        streams.company(company_id), 0, [ev.CompanyCreated(company_id=company_id, name=name)], meta
    )
    password = passwords.generate_password()
    user_id = await add_user(ctx, company_id, email, "admin", password, meta)
    key_id, key = await issue_admin_key(ctx, company_id, "first admin key", meta, owner=user_id)
    return NewCompany(company_id, user_id, email, password, key_id, key)


async def add_user(
    ctx: Context, company_id: str, email: str, role: str, password: str, meta: Metadata
) -> str:
    """A new account of `email` at the company. Refused (409) only when the company has a
    live account of that address already, which its admins see in their own list: an
    address with an account at another company is added like a new one, by the same steps
    (the password hashed, one append at the version of a stream of this company's own),
    so the answer says nothing about other companies' users."""
    if role not in ROLES:
        raise FieldError("role", "must be admin or member")
    email = normalise_email(email)
    password_hash = await _hash(ctx, company_id, email, password)
    user_id = credentials.new_id("usr")
    event = ev.UserAdded(
        company_id=company_id, user_id=user_id, email=email, role=role, password_hash=password_hash
    )
    taken = f"a user with email {email} already exists in this company"
    stream = streams.account(company_id, email)
    for _ in range(2):
        # The stream's version first, then the model caught up: the model then holds at
        # least what the stream held, and whatever commits after the read fails the
        # append. Across processes the stream's version keeps the address unique here; an
        # address whose previous holder here was removed may be given again (the stream
        # goes on).
        version = await ctx.eventlog.stream_version(stream)
        await ctx.refresh()
        # A live account here, on this stream or (created before accounts were per
        # company) on the address's own: the stream alone would not see the latter.
        if ctx.directory.account(company_id, email) is not None:
            raise Conflict(taken)
        try:
            await ctx.record(stream, version, [event], meta)
        except ConcurrencyError as exc:
            if exc.stream_id != stream:
                raise
            continue  # added (or removed and added) through another process: decide again
        return user_id
    raise Conflict(taken)


_SCORING = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="password-scoring")


async def _hash(
    ctx: Context, company_id: str, email: str, password: str, field: str = "password"
) -> str:
    """The password's hash, once it is found hard enough to guess for this account: its
    address and its company's name are among what it must not be made of."""
    company = ctx.directory.companies.get(company_id)
    context = [email] if company is None else [email, company.name]
    try:
        # On a thread of its own: scoring waits for scoring, never a sign-in's hash check
        # in the shared executor
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(_SCORING, passwords.check_strength, password, context)
    except passwords.WeakPassword as exc:
        raise FieldError(field, str(exc)) from None
    return await asyncio.to_thread(passwords.hash_password, password)


# --- a user's role, removal and password ----------------------------------------------


async def _company_users(ctx: Context, company_id: str) -> tuple[int, dict[str, str]]:
    """The company stream's version and the live users (id → role) as of that version.
    The model is caught up first; whatever commits after that fails the append."""
    await ctx.refresh()
    company = ctx.directory.companies.get(company_id)
    if company is None:
        raise NotFound("no such user")
    users = {u.user_id: u.role for u in ctx.directory.company_users(company_id)}
    return company.version, users


async def _record_on_company(
    ctx: Context, company_id: str, event: ev.Event, version: int, meta: Metadata
) -> bool:
    """False when the company stream moved meanwhile: decide again."""
    stream = streams.company(company_id)
    try:
        await ctx.record(stream, version, [event], meta)
    except ConcurrencyError as exc:
        if exc.stream_id != stream:
            raise
        return False
    return True


async def change_role(
    ctx: Context, company_id: str, user_id: str, role: str, meta: Metadata
) -> None:
    """Recorded on the company's stream at the version the decision saw: two admins
    demoting each other at once cannot leave the company without one."""
    for attempt in range(MAX_ATTEMPTS):
        version, users = await _company_users(ctx, company_id)
        event = user_rules.change_role(company_id, users, user_id, role)
        if event is None:
            return
        if await _record_on_company(ctx, company_id, event, version, meta):
            if role != "admin":
                await _revoke_keys_of(ctx, company_id, user_id, meta)
            return
        await backoff(attempt)
    raise still_changing("the company's users")


async def remove_user(ctx: Context, company_id: str, user_id: str, meta: Metadata) -> None:
    """The user can no longer sign in, every session of theirs ends at once, and every
    admin key of theirs is revoked."""
    for attempt in range(MAX_ATTEMPTS):
        version, users = await _company_users(ctx, company_id)
        event = user_rules.remove(company_id, users, user_id)
        if await _record_on_company(ctx, company_id, event, version, meta):
            await end_sessions(ctx, user_id)
            await _revoke_keys_of(ctx, company_id, user_id, meta)
            return
        await backoff(attempt)
    raise still_changing("the company's users")


async def end_sessions(ctx: Context, user_id: str) -> None:
    """Every process reads a session's row on each request: with the rows gone, no process
    accepts them, whatever it has or has not applied of the log yet."""
    await ctx.pool.execute("DELETE FROM web_sessions WHERE user_id = $1", user_id)


def _check_live(ctx: Context, user_id: str, company_id: str | None = None) -> None:
    user = ctx.directory.users.get(user_id)
    if user is None or user.removed or company_id not in (None, user.company_id):
        raise NotFound("no such user")


async def _stream_of(ctx: Context, user_id: str) -> str:
    """The stream the user was created on, where every later event of theirs goes: their
    company's stream of the address, or, for a user added before accounts were per company,
    the address's own. The log says which (the in-memory model is fed without stream
    names); another company's account of the address is on neither."""
    user = ctx.directory.users[user_id]
    for stream in (streams.account(user.company_id, user.email), streams.user(user.email)):
        for recorded in await ctx.eventlog.read_stream(stream):
            if isinstance(recorded.event, ev.UserAdded) and recorded.event.user_id == user_id:
                return stream
    raise NotFound("no such user")


async def reset_password(
    ctx: Context, company_id: str, user_id: str, meta: Metadata, password: str | None = None
) -> str:
    """An admin sets a user's password: `password`, or a generated one, returned (to be
    shown once). The user's sessions end."""
    await ctx.refresh()
    _check_live(ctx, user_id, company_id)
    new = passwords.generate_password() if password is None else password
    user = ctx.directory.users[user_id]
    password_hash = await _hash(ctx, company_id, user.email, new)
    event = ev.UserPasswordChanged(
        company_id=company_id, user_id=user_id, password_hash=password_hash
    )
    # this account's own stream: another company's account of the address is not touched
    await ctx.record(await _stream_of(ctx, user_id), None, [event], meta)
    await end_sessions(ctx, user_id)
    return new


class WrongPassword(Forbidden):
    error = "invalid_credentials"


async def change_own_password(
    ctx: Context, user_id: str, current: str, new: str, meta: Metadata
) -> None:
    """A user changes their own password, proving the current one. Every session of
    theirs ends, the caller's too (it is for the caller to open a new one)."""
    await ctx.refresh()
    _check_live(ctx, user_id)
    user = ctx.directory.users[user_id]
    ok = await asyncio.to_thread(passwords.verify_password, current, user.password_hash)
    if not ok:
        raise WrongPassword("the current password is wrong")
    if passwords.normalised(new) == passwords.normalised(current):
        raise FieldError("new_password", "must differ from the current password")
    password_hash = await _hash(ctx, user.company_id, user.email, new, "new_password")
    event = ev.UserPasswordChanged(
        company_id=user.company_id, user_id=user_id, password_hash=password_hash
    )
    stream = await _stream_of(ctx, user_id)
    try:
        # at the version whose password was verified: a reset that came first wins
        await ctx.record(stream, user.version, [event], meta)
    except ConcurrencyError:
        raise Conflict("the password was changed meanwhile; sign in again") from None
    await end_sessions(ctx, user_id)


async def issue_admin_key(
    ctx: Context, company_id: str, label: str, meta: Metadata, *, owner: str | None = None
) -> tuple[str, str]:
    """A new admin key, the person's who asks for it (through their session or a key of
    theirs), or `owner`'s: the first admin's, for the key printed with a new company."""
    if len(label) > 100:
        raise FieldError("label", "must be at most 100 characters")
    if not label.isprintable():
        raise FieldError("label", "must not contain control characters")
    key = credentials.new_admin_key()
    key_id = credentials.new_id("key")
    event = ev.AdminKeyIssued(
        company_id=company_id, key_id=key_id, key_hash=credentials.digest(key), label=label,
        issued_by=owner or await _person_behind(ctx, meta.actor),
    )  # fmt: skip
    await ctx.record(streams.admin_key(key_id), 0, [event], meta)
    return key_id, key


#: how far back a chain of keys, each issued with the one before, is followed
_MAX_CHAIN = 20


async def _person_behind(ctx: Context, actor: str) -> str | None:
    """The admin an actor acts for: a user, or the person whose key it uses, through a
    chain of keys (None: nobody's, the command line's). A key issued before keys named
    their person is the person's whose session (or key) the log says issued it."""
    for _ in range(_MAX_CHAIN):
        kind, _, ident = actor.partition(":")
        if kind == "user":
            return ident
        if kind != "admin_key":
            return None
        key = ctx.directory.admin_keys.get(ident)
        if key is not None and key.issued_by is not None:
            return key.issued_by
        issued = await ctx.eventlog.read_stream(streams.admin_key(ident))
        if not issued:
            return None
        actor = issued[0].metadata.actor
    return None


async def _revoke_keys_of(ctx: Context, company_id: str, user_id: str, meta: Metadata) -> None:
    """Every live admin key of a person who is no longer an admin: a key outlived its
    admin's removal, and could add a new admin account for them. Recorded on each key's
    stream at its issued version, as any revocation: one revoked meanwhile is left so. Not
    held to the key the caller acts with, as its other changes are: the removal or the
    demotion is recorded already, and this is what it means."""
    await ctx.refresh()  # keys issued through other processes a moment ago
    for key in ctx.directory.company_keys(company_id):
        if key.revoked:
            continue
        person = key.issued_by or await _person_behind(ctx, f"admin_key:{key.key_id}")
        if person != user_id:
            continue
        event = ev.AdminKeyRevoked(company_id=company_id, key_id=key.key_id)
        revocation = Record(streams.admin_key(key.key_id), 1, (event,))
        with contextlib.suppress(ConcurrencyError):
            await ctx.ledger.record(revocation, meta, visible=True)


async def revoke_admin_key(ctx: Context, company_id: str, key_id: str, meta: Metadata) -> None:
    key = ctx.directory.admin_keys.get(key_id)
    if key is None or key.company_id != company_id:
        raise NotFound("no such admin key")
    if key.revoked:
        return
    event = ev.AdminKeyRevoked(company_id=company_id, key_id=key_id)
    try:
        await ctx.record(streams.admin_key(key_id), 1, [event], meta)
    except ConcurrencyError:
        return  # revoked concurrently: the outcome asked for holds


async def register_resource_server(ctx: Context, name: str, meta: Metadata) -> tuple[str, str]:
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise InvalidRequest("name must be 1 to 100 characters")
    key = credentials.new_resource_server_key()
    server_id = credentials.new_id("rs")
    event = ev.ResourceServerRegistered(
        resource_server_id=server_id, name=name, key_hash=credentials.digest(key)
    )
    await ctx.record(streams.resource_server(server_id), 0, [event], meta)
    return server_id, key


@dataclass(frozen=True)
class ResourceServerInfo:
    resource_server_id: str
    name: str
    revoked: bool


async def list_resource_servers(ctx: Context) -> list[ResourceServerInfo]:
    """Every resource server registered, revoked ones included (never a key)."""
    await ctx.refresh()
    servers = ctx.directory.resource_servers.values()
    return [
        ResourceServerInfo(s.resource_server_id, s.name, s.revoked)
        for s in sorted(servers, key=lambda s: (s.name.lower(), s.resource_server_id))
    ]


async def revoke_resource_server(ctx: Context, server_id: str, meta: Metadata) -> None:
    """Its key is refused from then on; revoking a revoked one changes nothing."""
    await ctx.refresh()
    server = ctx.directory.resource_servers.get(server_id)
    if server is None:
        raise NotFound(f"no resource server {server_id!r}")
    if server.revoked:
        return
    event = ev.ResourceServerKeyRevoked(resource_server_id=server_id)
    try:
        await ctx.record(streams.resource_server(server_id), 1, [event], meta)
    except ConcurrencyError:
        return  # revoked concurrently: the outcome asked for holds
